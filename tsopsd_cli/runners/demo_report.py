"""What the study's runs measured, the statistics the verdict comes from, and summary.md / summary.json / plots.

Reads only the runs' own outputs (metrics.jsonl, report.json, the eval reports); the statistics are core.paired's.
Nothing here is tuned or edited by hand: the verdict is `core.paired.verdict` of these numbers.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

from tsopsd_cli.core import paired
from tsopsd_cli.report import json_safe, pyplot

PRIMARY_SET = "toy-bracket"  # the stranded family's test problems (validation of every study run)
NATURAL_SET = "toy"
DECISIVE = ("continued-rl-matched", "rollout-temperature")  # what TS-OPSD must beat for `supported`
ARM_TITLES = {
    "base-control": "control: continued RL from the base (exploration intact)",
    "continued-rl": "control and arm: continued RL from the collapsed checkpoint",
    "continued-rl-matched": "continued RL, as many rollouts as TS-OPSD's reheat + RL",
    "rollout-temperature": "continued RL sampling rollouts at tau",
    "fold": "exact fold (final norm / tau), then RL",
    "ts-opsd": "TS-OPSD reheat at tau, then RL",
    "thermostat": "RL with the entropy thermostat (reheat steps inside the budget)",
    "high-entropy-tokens": "RL with the policy loss on the top-entropy tokens only",
    "entropy-adaptive": "RL with an entropy bonus steered to a target entropy",
}


# ------------------------------------------------------------------------------------------ one run's numbers
def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def curve(run: Path, key: str = "val_accuracy", set_name: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of a run's validations (one per step: the last row that has it); `set_name`: that set's
    accuracy (key val_accuracy) or right-plan share (val_right_plan) in the rows' val_by_set."""
    out: dict[int, float] = {}
    for r in rows(run):
        if set_name is None:
            v = r.get(key)
        else:  # one set's value, from the rows of a run that validates on several
            v = r.get("val_by_set", {}).get(set_name, {}).get("accuracy" if key == "val_accuracy" else "right_plan")
        if v is not None:
            out[r["step"]] = v
    return sorted(out.items())


def auc(points: list[tuple[int, float]]) -> float:
    """The area under a curve of (step, value), steps scaled to [0, 1] (trapezoids): the mean value over the run,
    every part of it counting, the start included."""
    if len(points) < 2:
        raise ValueError("an area needs at least two validation points")
    (x0, _), (x1, _) = points[0], points[-1]
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))
    return area / (x1 - x0)


def eval_accuracy(folder: Path, temperatures: list[float]) -> dict[str, dict[str, float]]:
    """{T: {set: accuracy}} of the evaluations in folder/eval-T<t>."""
    out = {}
    for t in temperatures:
        report = json.loads((folder / f"eval-T{t:g}" / "report.json").read_text())
        out[f"{t:g}"] = {name: b["accuracy"] for name, b in report["benchmarks"].items()}
    return out


def rollouts_of(run: Path) -> int:
    """Every rollout a training run sampled: its steps x prompts per step x samples per prompt."""
    report = json.loads((run / "report.json").read_text())
    rec = report["recipe"]
    return report["steps"] * rec["train"]["prompts_per_step"] * rec["rollout"]["num_generations"]


def weights_sha256(ckpt: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- calibration
def choose(candidates: dict[str, list[dict]], runs: dict[str, list[Path]], tolerance: float) -> dict:
    """The calibration rule (docs/demo.md), per arm: among its candidates whose natural-mix training accuracy at
    the end is at least continued-rl's minus `tolerance`, the one with the largest stranded-family training
    accuracy AUC (the first listed on a tie); when none is admissible, the one that forgot least."""
    baseline = curve(runs["continued-rl"][0], set_name=NATURAL_SET)[-1][1]
    out = {}
    for arm, options in candidates.items():
        table = []
        for option, run in zip(options, runs[arm]):
            natural = curve(run, set_name=NATURAL_SET)[-1][1]
            table.append({"setting": option, "stranded_auc": auc(curve(run, set_name=PRIMARY_SET)),
                          "natural_accuracy": natural, "admissible": natural >= baseline - tolerance})
        ok = [row for row in table if row["admissible"]]
        best = max(ok, key=lambda row: row["stranded_auc"]) if ok else max(table, key=lambda r: r["natural_accuracy"])
        out[arm] = {"setting": best["setting"], "candidates": table, "baseline_natural_accuracy": baseline,
                    "rule": "largest stranded AUC among admissible" if ok else "none admissible: least forgetting"}
    return out


# ----------------------------------------------------------------------------------------------------- study
def start_folder(out: Path, arm: str, seed: int) -> tuple[Path, Path]:
    """(the start checkpoint of an arm's seed, the folder of its start evaluations)."""
    if arm == "base-control":
        return out / "base", out / "base-start"
    if arm == "ts-opsd":
        return out / "reheat" / f"seed-{seed}", out / "reheat" / f"seed-{seed}-start"
    if arm == "fold":
        return out / "fold", out / "fold-start"
    return out / "collapsed", out / "collapsed-start"


def arm_numbers(recipe, out: Path, arm: str, seed_runs: dict[int, Path]) -> dict:
    d = recipe.demo
    temps = d.temperatures
    per_seed = []
    for s in d.seeds:
        run = seed_runs[s] / "run"
        start, start_evals = start_folder(out, arm, s)
        acc_curve = curve(run)
        plan_curve = curve(run, "val_right_plan")
        rollouts = rollouts_of(run) + (rollouts_of(start) if arm == "ts-opsd" else 0)
        per_seed.append({"primary": auc(acc_curve), "escaped": plan_curve[-1][1] >= d.escape_bar,
                         "final_right_plan": plan_curve[-1][1], "curve": acc_curve, "right_plan_curve": plan_curve,
                         "rollouts": rollouts, "start_sha256": weights_sha256(start),
                         "start": eval_accuracy(start_evals, temps), "end": eval_accuracy(seed_runs[s], temps)})
    by_t = {}
    for when in ("start", "end"):
        by_t[when] = {t: {name: statistics.fmean(p[when][t][name] for p in per_seed)
                          for name in per_seed[0][when][t]} for t in per_seed[0][when]}
    return {
        "title": ARM_TITLES[arm],
        "primary_per_seed": [p["primary"] for p in per_seed],
        "escaped_per_seed": [p["escaped"] for p in per_seed],
        "final_right_plan_per_seed": [p["final_right_plan"] for p in per_seed],
        "rollouts": [p["rollouts"] for p in per_seed],
        "start_sha256_per_seed": [p["start_sha256"] for p in per_seed],
        "accuracy_by_temperature": by_t,
        "natural_accuracy_end_per_seed": [p["end"]["1"][NATURAL_SET] if "1" in p["end"] else None for p in per_seed],
        "curves": [p["curve"] for p in per_seed],
    }


def controls(arms: dict, alpha: float) -> dict:
    base, coll = arms["base-control"]["escaped_per_seed"], arms["continued-rl"]["escaped_per_seed"]
    p = paired.mcnemar_p(base, coll)
    return {"base": {"escaped_per_seed": base, "primary_per_seed": arms["base-control"]["primary_per_seed"]},
            "collapsed": {"escaped_per_seed": coll, "primary_per_seed": arms["continued-rl"]["primary_per_seed"]},
            "mcnemar_p": p, "separated": sum(base) > sum(coll) and p < alpha}


def representation(out: Path, seeds: list[int]) -> dict:
    """Per point compared with the collapsed checkpoint at tau: the mean over seeds of each measure."""
    per = [json.loads((out / "representation" / f"seed-{s}.json").read_text()) for s in seeds]
    result = {}
    for point in per[0]:
        vals = [p[point] for p in per]
        k = max(vals[0]["topk_overlap_mass"], key=int)
        row = {"mass_overlap": [v["mass_overlap"] for v in vals],
               f"top{k}_overlap_mass": [v["topk_overlap_mass"][k] for v in vals],
               "top1_agreement": [v["top1_agreement"] for v in vals],
               "cka_mean": [statistics.fmean(v["cka"]) for v in vals], "cka_last": [v["cka"][-1] for v in vals],
               "kl_forward": [v["kl_forward"] for v in vals]}
        result[point] = {key: {"mean": statistics.fmean(xs), "per_seed": xs} for key, xs in row.items()}
    return result


def unseparated_reason(ctl: dict, n: int, alpha: float) -> str:
    """Why controls that do not separate leave the study untestable, and whether more seeds could change that: with
    n paired seeds the exact McNemar test reaches 2 * 2^-n at best, so below 6 seeds no outcome separates them."""
    why = (f"the controls do not separate: the base escaped in {sum(ctl['base']['escaped_per_seed'])} of {n} seeds, "
           f"the collapsed checkpoint in {sum(ctl['collapsed']['escaped_per_seed'])} (exact McNemar p "
           f"{ctl['mcnemar_p']:.3g}, needs < {alpha:g}): ")
    best = paired.smallest_p(n)
    if best >= alpha:
        return why + (f"with {n} paired seed{'s' if n > 1 else ''} the test cannot reach p < {alpha:g} whatever the "
                      f"runs do (at best {best:.3g}); a verdict needs more seeds: tsopsd demo --full (ten paired "
                      "seeds)")
    return why + "this setting cannot show whether a start restores exploration"


def summarize(recipe, out: Path, settings: dict, runs: dict[str, dict[int, Path]]) -> dict:
    d = recipe.demo
    n = len(d.seeds)
    arms = {arm: arm_numbers(recipe, out, arm, seed_runs) for arm, seed_runs in runs.items()}
    ctl = controls(arms, d.alpha)
    compared = {a: v for a, v in arms.items() if a != "base-control"}
    comparisons = paired.compare("ts-opsd", {a: v["primary_per_seed"] for a, v in compared.items()},
                                 {a: v["escaped_per_seed"] for a, v in compared.items()}, d.margin, d.alpha) \
        if n > 1 else []
    if not ctl["separated"]:
        verdict, why = "untestable", unseparated_reason(ctl, n, d.alpha)
    elif any(a not in compared for a in DECISIVE):
        verdict, why = "untestable", f"the decisive arms {', '.join(DECISIVE)} did not all run"
    else:
        verdict = paired.verdict(True, comparisons, DECISIVE, d.alpha)
        why = {"supported": "TS-OPSD is better than both decisive comparators (Holm-adjusted p < alpha)",
               "refuted": "TS-OPSD is worse than, or equivalent within the margin to, a decisive comparator",
               "not separated": "the decisive comparisons are neither significant nor equivalent"}[verdict]
        best = paired.smallest_p(n, len(comparisons))
        if verdict == "not separated" and best >= d.alpha:
            why += (f"; with {n} paired seeds and {len(comparisons)} comparisons no Holm-adjusted p can fall below "
                    f"{d.alpha:g} (at best {best:.3g}): a verdict needs more seeds")
    return {
        "command": "demo", "verdict": verdict, "verdict_reason": why,
        "design": {"seeds": d.seeds, "budget_steps": d.budget_steps, "primary_metric": d.primary_metric,
                   "margin": d.margin, "alpha": d.alpha, "escape_bar": d.escape_bar, "eval_points": d.eval_points,
                   "temperatures": d.temperatures, "calibration_seed": d.calibration_seed,
                   "decisive": list(DECISIVE)},
        "settings": settings, "controls": ctl, "arms": arms,
        "comparisons": [{"arm": c.arm, "vs": c.vs, "diff_mean": c.diff_mean, "ci": list(c.ci), "p": c.p,
                         "p_holm": c.p_holm, "p_tost": c.p_tost, "mcnemar_p": c.mcnemar_p} for c in comparisons],
        "representation": representation(out, d.seeds),
    }


# ------------------------------------------------------------------------------------------------- writing
def write(summary: dict, out: Path, plots: bool = True) -> None:
    if plots:
        summary["plots"] = plot(summary, out)
    files = {"summary.json": json.dumps(json_safe(summary), indent=1) + "\n", "summary.md": markdown(summary)}
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def _f(x, n: int = 3) -> str:
    return "—" if x is None else f"{x:.{n}f}"


def _pm(xs: list[float]) -> str:
    return _f(statistics.fmean(xs)) + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def markdown(s: dict) -> str:
    d, ctl = s["design"], s["controls"]
    n = len(d["seeds"])
    lines = ["# tsopsd demo: is a TS-OPSD-reheated checkpoint a better start for continued RL?", "",
             f"**Verdict: {s['verdict']}** — {s['verdict_reason']}.", "",
             f"Design: {n} paired seeds {d['seeds']}; budget {d['budget_steps']} continued-RL steps on the bracket "
             f"and neutral families; primary metric {d['primary_metric']} (accuracy on the stranded family's "
             f"test problems, area under its curve over the budget); escaped = right plan >= {d['escape_bar']:g} "
             f"at the end; alpha {d['alpha']:g}, equivalence margin {d['margin']:g}.", "",
             "## Controls", "",
             f"From the base, continued RL escaped in {sum(ctl['base']['escaped_per_seed'])} of {n} seeds; from "
             f"the collapsed checkpoint in {sum(ctl['collapsed']['escaped_per_seed'])} of {n} (exact McNemar p "
             f"{ctl['mcnemar_p']:.3g}): the controls {'separate' if ctl['separated'] else 'do not separate'}.", ""]
    if s["comparisons"]:
        lines += ["## TS-OPSD against each arm (paired over seeds)", "",
                  "| vs | diff (mean) | 95 % CI | p (sign-flip) | p (Holm) | p (TOST) | McNemar p |",
                  "|---|---|---|---|---|---|---|"]
        for c in s["comparisons"]:
            lines.append(f"| {c['vs']} | {c['diff_mean']:+.4f} | [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] | "
                         f"{c['p']:.4f} | {c['p_holm']:.4f} | {c['p_tost']:.4f} | {c['mcnemar_p']:.4f} |")
        lines.append("")
    temps = d["temperatures"]
    lines += ["## Arms", "", "| arm | primary (mean ± sd) | escaped | rollouts | "
              + " | ".join(f"end acc. stranded / natural @ {t:g}" for t in temps) + " |",
              "|---|---|---|---|" + "---|" * len(temps)]
    for name, a in s["arms"].items():
        end = a["accuracy_by_temperature"]["end"]
        cells = [f"{_f(end[f'{t:g}'].get(PRIMARY_SET))} / {_f(end[f'{t:g}'].get(NATURAL_SET))}" for t in temps]
        lines.append(f"| {name}: {a['title']} | {_pm(a['primary_per_seed'])} | {sum(a['escaped_per_seed'])}/{n} "
                     f"| {statistics.fmean(a['rollouts']):,.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Start accuracy (stranded / natural) at each temperature:", "",
              "| arm | " + " | ".join(f"@ {t:g}" for t in temps) + " |", "|---|" + "---|" * len(temps)]
    for name, a in s["arms"].items():
        st = a["accuracy_by_temperature"]["start"]
        lines.append(f"| {name} | " + " | ".join(f"{_f(st[f'{t:g}'].get(PRIMARY_SET))} / "
                                                 f"{_f(st[f'{t:g}'].get(NATURAL_SET))}" for t in temps) + " |")
    lines += ["", "## Representation (against the collapsed checkpoint at TS-OPSD's tau)", "",
              "| point | mass overlap | top-k mass overlap | top-1 agreement | CKA (mean) | CKA (last layer) |",
              "|---|---|---|---|---|---|"]
    for point, r in s["representation"].items():
        k = next(key for key in r if key.endswith("_overlap_mass"))
        lines.append(f"| {point} | {_f(r['mass_overlap']['mean'])} | {_f(r[k]['mean'])} | "
                     f"{_f(r['top1_agreement']['mean'])} | {_f(r['cka_mean']['mean'])} | "
                     f"{_f(r['cka_last']['mean'])} |")
    lines += ["", "## Settings (chosen by the calibration rule before any arm ran)", ""]
    for arm, c in s["settings"].items():
        lines.append(f"- {arm}: {json.dumps(c['setting'])}" + ("" if not c.get("candidates") else
                     f" ({c['rule']}; {len(c['candidates'])} candidates, calibration.json)"))
    lines.append("")
    if s.get("plots"):
        lines += [f"![{p}]({p})" for p in s["plots"]] + [""]
    return "\n".join(lines)


def plot(s: dict, out: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (name, a) in enumerate(s["arms"].items()):
        steps = sorted({x for c in a["curves"] for x, _ in c})
        mean = [statistics.fmean(dict(c)[x] for c in a["curves"] if x in dict(c)) for x in steps]
        ax.plot(steps, mean, label=name, color=f"C{i}")
    ax.set_xlabel("continued-RL step")
    ax.set_ylabel("stranded-family accuracy (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out / ".stranded_accuracy.tmp.png"
    fig.savefig(tmp, dpi=110)
    tmp.replace(out / "stranded_accuracy.png")
    plt.close(fig)
    return ["stranded_accuracy.png"]
