"""Samples graded per second: tsopsd's Grader (fast path + math-verify in worker processes under a per-answer
time limit) against a plain single-process math-verify loop, in the same run.

    python benchmarks/grading_throughput.py [--data-dir ../shared/data/benchmarks] [--copies 4] [--cap 120]

Workload: the reference solutions of MATH-500 and AIME24 graded against their golds, repeated `--copies` times
with the golds of the copies after the first shifted to other problems (so that wrong answers are graded too),
plus 3 pathological answers (towers of exponents) that make math-verify run for minutes.
The plain loop runs in a subprocess capped at `--cap` seconds; a loop that hits the cap is reported as stalled.
Target (issue 3): the Grader is faster, and never stalled by a pathological answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHOLOGICAL = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2^{2^{2^{2^{2^{2}}}}}}", r"\boxed{10^{10^{10}}!}"]


def workload(data_dir: Path, copies: int, pathological: bool) -> list[tuple[str, str]]:
    from tsopsd_cli.tasks.grading import extract_boxed

    rows = []
    for name in ("math500.jsonl", "aime24.jsonl"):
        rows += [json.loads(line) for line in open(data_dir / name)]
    sols = [r["solution"] for r in rows if extract_boxed(r["solution"]) is not None]
    golds = [str(r["answer"]) for r in rows if extract_boxed(r["solution"]) is not None]
    pairs = []
    for c in range(copies):
        pairs += [(s, golds[(i + c * 7) % len(golds)]) for i, s in enumerate(sols)]
    if pathological:
        pairs += [(p, "5") for p in PATHOLOGICAL]
    return pairs


def plain_loop(pairs) -> dict:
    """What a script without time limits does: math-verify on every answer, one after another."""
    from math_verify import parse, verify

    from tsopsd_cli.tasks.grading import extract_boxed

    logging.disable(logging.CRITICAL)
    t0 = time.perf_counter()
    correct = 0
    for text, gold in pairs:
        pred = extract_boxed(text)
        if pred is None:
            continue
        g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
        correct += bool(g and p and verify(g, p, timeout_seconds=None))
    return {"seconds": time.perf_counter() - t0, "correct": correct, "n": len(pairs)}


def tsopsd_grader(pairs, workers: int, timeout: float) -> dict:
    from tsopsd_cli.tasks.grading import Grader

    t0 = time.perf_counter()
    with Grader(workers=workers, timeout=timeout) as g:
        res = g.grade_many(pairs)
        timeouts = g.timeouts
    return {"seconds": time.perf_counter() - t0, "correct": sum(r.correct for r in res), "n": len(pairs),
            "timeouts": timeouts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "benchmarks")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--cap", type=float, default=120.0, help="seconds before the plain loop counts as stalled")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--plain-arm", choices=["clean", "pathological"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_arm:
        print(json.dumps(plain_loop(workload(args.data_dir, args.copies, args.plain_arm == "pathological"))))
        return 0
    print(f"workload: {len(workload(args.data_dir, args.copies, False))} graded samples "
          f"(+{len(PATHOLOGICAL)} pathological in the second set)")
    summary = {}
    for arm in ("clean", "pathological"):
        pairs = workload(args.data_dir, args.copies, arm == "pathological")
        ours = tsopsd_grader(pairs, args.workers, args.timeout)
        cmd = [sys.executable, __file__, "--plain-arm", arm, "--data-dir", str(args.data_dir),
               "--copies", str(args.copies)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cap)
            plain = json.loads(proc.stdout.strip().splitlines()[-1])
            plain_rate = plain["n"] / plain["seconds"]
            plain_text = f"{plain_rate:8.1f} samples/s ({plain['seconds']:.1f} s, {plain['correct']} correct)"
        except subprocess.TimeoutExpired:
            plain, plain_rate = None, 0.0
            plain_text = f"STALLED: not done after {args.cap:.0f} s"
        rate = ours["n"] / ours["seconds"]
        print(f"[{arm}] plain math-verify loop: {plain_text}")
        print(f"[{arm}] tsopsd Grader:          {rate:8.1f} samples/s ({ours['seconds']:.1f} s, "
              f"{ours['correct']} correct, {ours['timeouts']} timed out)")
        ratio = rate / plain_rate if plain_rate else float("inf")
        print(f"[{arm}] speed-up: {ratio:.1f}x" + (" (the plain loop stalled)" if plain is None else ""))
        summary[arm] = {"grader_samples_per_s": rate, "plain_samples_per_s": plain_rate or None,
                        "speedup": ratio if plain_rate else None, "plain_stalled": plain is None,
                        "grader_correct": ours["correct"], "plain_correct": plain and plain["correct"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
