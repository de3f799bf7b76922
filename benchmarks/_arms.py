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
