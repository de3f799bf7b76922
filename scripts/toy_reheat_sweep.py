"""Sweep TS-OPSD settings from a collapsed toy checkpoint, measuring every result on training-split problems only.

    python scripts/toy_reheat_sweep.py COLLAPSED OUT "temp=2.0 steps=20 lr=1e-4" ["temp=3.0 steps=10" ...]
        [--problems 256] [-n 8]

Each quoted setting is one `tsopsd reheat COLLAPSED --recipe recipes/reheat/toy.yaml` run into OUT/<name> with
`reheat.target_entropy_ratio` off unless given (keys: temp, steps, lr, ratio, target, top_p, seed, method:
fold for the exact fold at temp, teacher: frozen, live or ema, decay: the EMA teacher's), validation
off (it samples test problems), then `scripts/toy_families.py --split train` on the result. Rows are appended to
OUT/sweep.jsonl (a setting already there is skipped); the collapsed checkpoint itself is measured once as
"collapsed". Columns: train accuracy (avg@n), entropy at the plan letter and elsewhere, the bracket family's rate
of its right plan L and its accuracy, the precedence family's accuracy, and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = {"temp": "reheat.temp", "steps": "train.max_steps", "lr": "optim.lr", "ratio": "reheat.target_entropy_ratio",
        "target": "reheat.target_entropy", "top_p": "reheat.teacher_top_p", "seed": "train.seed",
        "method": "reheat.method", "teacher": "reheat.teacher", "decay": "reheat.teacher_ema_decay"}


def tsopsd() -> list[str]:
    exe = Path(sys.executable).with_name("tsopsd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tsopsd_cli"]


def families(ckpt: Path, problems: int, n: int) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "toy_families.py"), str(ckpt), "--split", "train",
                          "--problems", str(problems), "-n", str(n), "--json"], check=True, capture_output=True,
                         text=True).stdout
    r = json.loads(out)[str(ckpt)]
    return {"acc": r["all"]["acc"], "H_dec": r["all"]["H_dec"], "H_other": r["all"]["H_other"],
            "bracket_L": r["bracket"]["right_habit"], "bracket_acc": r["bracket"]["acc"],
            "bracket_stranded": r["bracket"]["stranded"], "prec_acc": r["precedence"]["acc"],
            "prec_P": r["precedence"]["right_habit"], "neutral_acc": r["neutral"]["acc"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("collapsed", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("settings", nargs="*")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("-n", type=int, default=8)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / "sweep.jsonl"
    done = {json.loads(line)["name"] for line in log.read_text().splitlines()} if log.exists() else set()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def append(row: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if "collapsed" not in done:
        append({"name": "collapsed", **families(a.collapsed, a.problems, a.n)})
    for setting in a.settings:
        kv = dict(item.split("=", 1) for item in setting.split())
        name = "_".join(f"{k}{v}" for k, v in kv.items())
        if name in done:
            continue
        sets = {KEYS[k]: v for k, v in kv.items()}
        if "reheat.target_entropy_ratio" not in sets:
            sets["reheat.target_entropy_ratio"] = "null"
        target = a.out / name
        cmd = [*tsopsd(), "reheat", str(a.collapsed), "--recipe", "recipes/reheat/toy.yaml", "--out", str(target),
               "--overwrite", "--json", "--set", "validation.enabled=false", "--set", "train.save_every=0"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        t0 = time.time()
        rep = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
        wall = round(time.time() - t0, 1)
        append({"name": name, **kv, "steps_run": rep.get("steps"), "stop": rep.get("stop_reason"), "wall_s": wall,
                **families(target, a.problems, a.n)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
