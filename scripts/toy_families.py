"""Per-family measurements of toy checkpoints: accuracy, pass@n, stranded problems, decisions, entropy.

    python scripts/toy_families.py CKPT [CKPT ...] [--problems 256] [-n 8] [--seed 0] [--split test] [--json]

For each checkpoint, samples n completions at temperature 1 for each of the first `--problems` toy test problems
(the toy benchmark's problems: `make_problems("test", N, 0)`; `--split train`: training-split problems,
`make_problems("train", N, 0)`, for choices that must not look at the test set) and reports, overall, per family
and per (level, family):
  acc        avg@n (mean reward)
  pass@n     share of problems with at least one correct completion
  stranded   share of problems with all n completions wrong (a zero-variance, all-wrong GRPO group)
  solved     share with all n correct;  mixed = 1 - stranded - solved (groups GRPO learns from)
  right_habit share of decision points at which the completion chose the family's correct habit
  exec       accuracy of the completions that chose the correct habit at every decision point (arithmetic only)
  H_dec / H_other   mean token entropy at decision points / at all other completion tokens (nats)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch


def measure(path: str, num: int, n: int, seed: int, max_new_tokens: int = 48, split: str = "test") -> dict:
    from tsopsd_cli.checkpoint import load_checkpoint
    from tsopsd_cli.engines import SamplingParams, encode_prompts
    from tsopsd_cli.engines.hf import HFEngine
    from tsopsd_cli.tasks import toy
    from tsopsd_cli.tasks.grading import extract_answer

    loaded = load_checkpoint(path, device="cpu")
    problems = toy.make_problems(split, num, 0)
    engine = HFEngine(loaded.model, loaded.tokenizer, batch_size=256)
    comps = engine.generate(encode_prompts(loaded.tokenizer, [p.prompt for p in problems]),
                            SamplingParams(num_generations=n, temperature=1.0, max_new_tokens=max_new_tokens,
                                           seed=seed))
    groups: dict = defaultdict(lambda: defaultdict(list))
    for i, p in enumerate(problems):
        cs = comps[i * n:(i + 1) * n]
        ok = [extract_answer(c.text) == str(p.answer) for c in cs]
        rec = {"ok": ok, "dec": [], "ents": [], "pos": [], "exec": []}
        for c, good in zip(cs, ok):
            tr = toy.trace_decisions(p, c.token_ids)
            rec["ents"].append(c.entropies)
            rec["pos"].append([q for q, _ in tr])
            rec["dec"] += [h == p.correct_habit for _, h in tr] if p.correct_habit else []
            if p.correct_habit is None or all(h == p.correct_habit for _, h in tr):
                rec["exec"].append(good)
        for key in ("all", p.family, f"L{p.level}-{p.family}"):
            for k, v in rec.items():
                groups[key][k].append(v)
    out = {}
    for key, g in sorted(groups.items()):
        oks = g["ok"]
        hd, ho = toy.decision_entropy_means([e for es in g["ents"] for e in es], [q for qs in g["pos"] for q in qs])
        dec = [d for ds in g["dec"] for d in ds]
        ex = [e for es in g["exec"] for e in es]
        out[key] = {
            "problems": len(oks),
            "acc": sum(map(sum, oks)) / (n * len(oks)),
            "pass@n": sum(any(o) for o in oks) / len(oks),
            "stranded": sum(not any(o) for o in oks) / len(oks),
            "solved": sum(all(o) for o in oks) / len(oks),
            "right_habit": sum(dec) / len(dec) if dec else None,
            "exec": sum(ex) / len(ex) if ex else None,
            "H_dec": hd, "H_other": ho,
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=["test", "train"], default="test")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {c: measure(c, a.problems, a.n, a.seed, split=a.split) for c in a.checkpoints}
    if a.json:
        json.dump(res, sys.stdout, indent=1)
        print()
        return 0
    f = lambda x: "   -" if x is None else f"{x:.3f}"  # noqa: E731
    for c, r in res.items():
        print(f"== {c}  (n={a.n})")
        print(f"{'group':22s} {'#':>4s} {'acc':>6s} {'pass@n':>6s} {'strand':>6s} {'solved':>6s} {'habit':>6s} "
              f"{'exec':>6s} {'H_dec':>6s} {'H_oth':>6s}")
        for k, v in r.items():
            print(f"{k:22s} {v['problems']:4d} {f(v['acc']):>6s} {f(v['pass@n']):>6s} {f(v['stranded']):>6s} "
                  f"{f(v['solved']):>6s} {f(v['right_habit']):>6s} {f(v['exec']):>6s} {f(v['H_dec']):>6s} "
                  f"{f(v['H_other']):>6s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
