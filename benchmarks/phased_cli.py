"""`python -m tsopsd_cli ARGS` with each phase of a training run timed: the same entry (tsopsd_cli.cli.app.main)
and arguments, plus benchmarks/_phases.py's meters around setup (load), rollouts, training, the optimiser step,
the report and the final save. `torchrun --nproc_per_node 1 benchmarks/phased_cli.py reheat CKPT ...` is the user's
`torchrun --nproc_per_node 1 -m tsopsd_cli reheat CKPT ...` with timers; the exit code is the command's.

Writes {"exit_code", "wall_seconds", "phases": {phase: {"seconds", "peak_GiB"}}} to the file $PHASES_JSON (or
stderr): seconds per phase summed over the run, the CUDA allocator's peak per phase (0 on the CPU)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from benchmarks._phases import PhaseMeter, training_patches
    from tsopsd_cli.cli.app import main as tsopsd_main

    args = sys.argv[1:]
    cuda = torch.cuda.is_available()
    meter = PhaseMeter(torch.cuda.reset_peak_memory_stats if cuda else (lambda: None),
                       torch.cuda.max_memory_allocated if cuda else (lambda: 0),
                       torch.cuda.synchronize if cuda else (lambda: None))
    if args and args[0] in ("rl", "reheat"):
        for owner, attr, name in training_patches(args[0]):
            meter.wrap(owner, attr, name)
    t0 = time.perf_counter()
    code = tsopsd_main(args)
    result = {"exit_code": code, "wall_seconds": round(time.perf_counter() - t0, 2),
              "phases": {ph: {"seconds": round(meter.seconds[ph], 2), "peak_GiB": round(meter.peak[ph] / 2**30, 3)}
                         for ph in meter.seconds}}
    where = os.environ.get("PHASES_JSON")
    if where:
        Path(where).write_text(json.dumps(result, indent=2))
    else:
        print(json.dumps(result), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
