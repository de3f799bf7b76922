"""Run each arm of a benchmark in a fresh subprocess and collect its JSON line (peak memory is per process)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def rss_mb() -> float:
    """Current resident memory of this process, MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_extra_mb(torch, dev, base: float) -> float:
    """Peak memory above `base` (MiB): CUDA allocator peak, or the process's peak RSS on CPU."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def baseline_mb(torch, dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return rss_mb()


def run_arms(script: str, args, names: tuple[str, ...]) -> dict[str, dict] | None:
    """Re-run `script --arm NAME` with the same options for each name; None if an arm failed."""
    results = {}
    for name in names:
        cmd = [sys.executable, script, "--arm", name] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "arm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name} arm failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def tsopsd_vs_trl(script: str, doc: str, run_tsopsd, run_trl) -> int:
    """The shared command line of the *_vs_trl benchmarks: `--checkpoint CKPT [--steps N] [--rounds R]` runs each
    side R times, alternating, each time in a fresh subprocess (`--side trl|tsopsd`, which calls
    `run_x(checkpoint, steps, workdir)` and prints {"step_seconds": [...]}), and prints the per-step time ratio
    of all timed steps and of each round. Alternating rounds keep a drift in the machine's speed (a shared host)
    from landing on one side only."""
    import argparse
    import tempfile
    from pathlib import Path

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--side", choices=["tsopsd", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        fn = run_tsopsd if args.side == "tsopsd" else run_trl
        print(json.dumps(fn(args.checkpoint, args.steps, Path(args.workdir))))
        return 0
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    steps: dict[str, list[float]] = {"trl": [], "tsopsd": []}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            this = {}
            for side in ("trl", "tsopsd"):
                cmd = [sys.executable, script, "--checkpoint", args.checkpoint, "--steps", str(args.steps),
                       "--side", side, "--workdir", str(Path(tmp) / f"{side}-{r}")]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{side} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    return 1
                this[side] = json.loads(proc.stdout.strip().splitlines()[-1])["step_seconds"]
                steps[side] += this[side]
            rounds.append(mean(this["tsopsd"]) / mean(this["trl"]))
            print(f"round {r + 1}: trl {mean(this['trl']):.2f} s/step, tsopsd {mean(this['tsopsd']):.2f} s/step, "
                  f"ratio {rounds[-1]:.2f}x")
    for side in ("trl", "tsopsd"):
        s = steps[side]
        print(f"{side:7s} {len(s)} timed steps, mean {mean(s):.2f} s/step (min {min(s):.2f}, max {max(s):.2f})")
    a, b = mean(steps["tsopsd"]), mean(steps["trl"])
    print(f"tsopsd / TRL time per step = {a / b:.2f}x over all rounds (rounds {min(rounds):.2f}-{max(rounds):.2f}x; "
          f"target <= 0.5x)")
    print(json.dumps({"tsopsd_s_per_step": a, "trl_s_per_step": b, "ratio": a / b, "round_ratios": rounds}))
    return 0


def timed_steps(run, steps: int) -> dict:
    """Set up a tsopsd TrainingRun and time `steps` training steps after one untimed warm-up step."""
    import time

    run.setup()
    times = []
    try:
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            run.train_step()
            run.sched.step()
            run.state.step += 1
            times.append(time.perf_counter() - t0)
    finally:
        run.close()
    return {"side": "tsopsd", "step_seconds": times[1:]}


def trl_step_timer(times: list[float]):
    """A transformers TrainerCallback appending each optimiser step's wall time to `times`."""
    import time

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    return Timer()


def memory_args(doc: str, chunk_size: int):
    """The shared command line of the naive-vs-chunked memory benchmarks."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=chunk_size)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arm", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    return ap.parse_args()


def tiny_qwen3_batch(args, models: int = 1):
    """([model, ...], packed batch) for an arm: `models` seeded random Qwen3s of the benchmark's width, depth and
    vocabulary, all with the first one's weights, and `args.seqs` random sequences of 16 prompt + tokens/seqs
    completion tokens, on `args.device`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tsopsd_cli.modeling import pack

    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                      intermediate_size=args.hidden * 3, max_position_embeddings=4096, tie_word_embeddings=False)
    built = [Qwen3ForCausalLM(cfg).to(dev) for _ in range(models)]
    for m in built[1:]:
        m.load_state_dict(built[0].state_dict())
    seq_len = args.tokens // args.seqs
    seqs = [(torch.randint(0, args.vocab, (16,)).tolist(), torch.randint(0, args.vocab, (seq_len,)).tolist())
            for _ in range(args.seqs)]
    return built, pack(seqs, 0, dev)
