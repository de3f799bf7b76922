"""`tsopsd demo`: the paper's experiment in miniature, end to end, on the toy world.

    base (toy init) -> collapsed (rl) -> { ts-opsd (reheat), fold (reheat --method fold) }
    continued RL, same budget, from: collapsed at rollout temperature 1 (continued-rl), collapsed at rollout
    temperature temp (rollout-temperature), ts-opsd, fold; one run per arm and seed
    diagnose of every starting point against the collapsed checkpoint; eval before and after continued RL

Every stage is an ordinary tsopsd run (the same runners as the commands) writing into its own folder, each
atomically, inside the demo's run directory (tsopsd_cli.rundir: `.OUT.partial/` until the summary is written,
then renamed to --out); with --resume, finished stages are kept and an interrupted one resumes from its last
checkpoint. The summary reports what happened, whichever arm comes out ahead.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from tsopsd_cli import signals
from tsopsd_cli.checkpoint import check_out
from tsopsd_cli.errors import Interrupted
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import DemoRecipe
from tsopsd_cli.recipe_loading import demo_stage, recipe_to_yaml
from tsopsd_cli.report import json_safe, pyplot
from tsopsd_cli.rundir import RunDir, run_key

ARM_TITLES = {"continued-rl": "continued RL (rollout T = 1)", "rollout-temperature": "rollout temperature = temp",
              "ts-opsd": "TS-OPSD reheat, then RL", "fold": "exact fold (norm / temp), then RL",
              "thermostat": "RL with the entropy thermostat"}


class Demo:
    def __init__(self, recipe: DemoRecipe, progress: Progress = NULL, resume: bool = False, restart: bool = False):
        self.r = recipe
        self.progress = progress
        self.final = Path(recipe.output.out or "runs/demo")
        self.temp = recipe.demo.temp
        check_out(self.final, recipe.output.overwrite)
        text = recipe_to_yaml(recipe)
        self.rundir = RunDir(self.final, key=run_key(recipe), log_name="stages.jsonl",
                          resume=resume, restart=restart, what="demo",
                             overwrite=recipe.output.overwrite)
        self.out = self.rundir.path  # every stage works in here until the whole demo is done
        (self.out / "recipe.yaml").write_text(text)

    # ------------------------------------------------------------------ stages
    def stage(self, name: str, target: Path, fn) -> Path:
        """Run `fn()` unless `target` (an atomically written output) is already there."""
        if target.exists():
            self.progress.log(f"[demo] {name}: done before, kept ({target})")
            return target
        signals.check(f"the demo, before {name}")
        self.progress.log(f"[demo] {name} -> {target}")
        t0 = time.time()
        fn()
        self.rundir.log.append([{"stage": name, "seconds": round(time.time() - t0, 1)}])
        return target

    @staticmethod
    def interrupted(target: Path) -> bool:
        """An rl/reheat run into `target` was started and not finished: resume it."""
        return (target.parent / f".{target.name}.partial").exists()

    def sub(self, stage: str, command: str, out: Path, **extra):
        return demo_stage(self.r, stage, command, **{"output.out": str(out), **extra})

    def run(self) -> dict:
        from tsopsd_cli.runners.reheat import run_fold, run_reheat
        from tsopsd_cli.runners.rl import run_rl
        from tsopsd_cli.runners.toy_init import run_toy_init

        started = time.time()
        d, o, p = self.r.demo, self.out, self.progress
        base = self.stage("toy init", o / "base", lambda: run_toy_init(self.sub("init", "toy-init", o / "base"), p))
        collapsed = self.stage("rl until collapse", o / "collapsed",
                               lambda: run_rl(self.sub("collapse", "rl", o / "collapsed"), str(base), p,
                                              resume=self.interrupted(o / "collapsed")))
        starts = {"continued-rl": collapsed, "rollout-temperature": collapsed, "thermostat": collapsed}
        if "ts-opsd" in d.arms:
            starts["ts-opsd"] = self.stage(
                "reheat (TS-OPSD)", o / "ts-opsd",
                lambda: run_reheat(self.sub("reheat", "reheat", o / "ts-opsd", **{"reheat.temp": self.temp}),
                                   str(collapsed), p, resume=self.interrupted(o / "ts-opsd")))
        if "fold" in d.arms:
            starts["fold"] = self.stage(
                "reheat (fold)", o / "fold",
                lambda: run_fold(self.sub("reheat", "reheat", o / "fold", **{"reheat.method": "fold",
                                                                              "reheat.temp": self.temp}),
                                 str(collapsed), p))
        points = {"base": base, "collapsed": collapsed, **{k: v for k, v in starts.items()
                                                           if k in ("ts-opsd", "fold")}}
        diag = {name: self.diagnose(name, ckpt, collapsed) for name, ckpt in points.items()}
        evals = {name: self.evaluate(name, ckpt) for name, ckpt in points.items()}
        runs: dict[str, list[dict]] = {}
        for arm in d.arms:
            for seed in d.seeds:
                runs.setdefault(arm, []).append(self.continued(arm, seed, starts[arm]))
        summary = self.summarize(diag, evals, runs)
        summary["seconds"] = round(time.time() - started, 1)  # this invocation
        # every stage's time from the stage log, stages finished by an earlier (interrupted) invocation included
        summary["stage_seconds"] = {row["stage"]: row["seconds"] for row in self.rundir.log.rows() if "stage" in row}
        summary["total_seconds"] = round(sum(summary["stage_seconds"].values()), 1)
        self.write(summary)
        summary["out"] = str(self.rundir.finish(before_rename=lambda: signals.check("the demo's finish")))
        return summary

    def diagnose(self, name: str, ckpt: Path, collapsed: Path | None) -> dict:
        """Diagnose of `ckpt` on its own rollouts (against `collapsed` when given and different)."""
        from tsopsd_cli.runners.diagnose import run_diagnose

        target = self.out / "diagnose" / name
        extra = {"diagnose.reference": str(collapsed)} if collapsed is not None and ckpt != collapsed else {}
        temps = sorted({1.0, self.temp})
        self.stage(f"diagnose {name}", target, lambda: run_diagnose(self.sub(
            "diagnose", "diagnose", target, **extra, **{"diagnose.temperatures": temps,
                                                        "diagnose.topk": [1, self.r.demo.topk]}), str(ckpt),
            self.progress))
        return json.loads((target / "report.json").read_text())

    def evaluate(self, name: str, ckpt: Path) -> dict:
        from tsopsd_cli.runners.evaluate import run_eval

        target = self.out / "eval" / name
        self.stage(f"eval {name}", target, lambda: run_eval(self.sub("eval", "eval", target), str(ckpt),
                                                             self.progress))
        return json.loads((target / "report.json").read_text())

    def continued(self, arm: str, seed: int, start: Path) -> dict:
        from tsopsd_cli.runners.rl import run_rl

        target = self.out / "arms" / arm / f"seed-{seed}"
        extra = {"train.seed": seed}
        if arm == "rollout-temperature":
            extra["rollout.temperature"] = self.temp
        if arm == "thermostat":
            extra.update(self.r.demo.thermostat)
        self.stage(f"continued RL: {arm}, seed {seed}", target, lambda: run_rl(
            self.sub("continued", "rl", target, **extra), str(start), self.progress,
            resume=self.interrupted(target)))
        ev = self.evaluate(f"{arm}-seed-{seed}", target)
        diag = self.diagnose(f"{arm}-seed-{seed}", target, None)
        rows = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines() if line.strip()]
        report = json.loads((target / "report.json").read_text())
        return {"seed": seed, "checkpoint": str(target), "eval": ev, "diagnose": diag, "metrics": rows,
                "thermostat": report.get("thermostat")}

    # ------------------------------------------------------------------ summary
    def summarize(self, diag: dict, evals: dict, runs: dict) -> dict:
        """The demo's summary: the collapse, every starting point, and each arm before and after continued RL."""
        arms = {arm: self.arm_summary(arm, seed_runs, diag, evals) for arm, seed_runs in runs.items()}
        base, coll = diag["base"], diag["collapsed"]
        return {
            "command": "demo", "temp": self.temp, "seeds": self.r.demo.seeds, "topk": self.r.demo.topk,
            "collapse": {"entropy_base": base["entropy"]["mean"], "entropy_collapsed": coll["entropy"]["mean"],
                         "entropy_ratio": base["entropy"]["mean"] / max(coll["entropy"]["mean"], 1e-12),
                         "accuracy_base": _accuracy(evals["base"])["avg"],
                         "accuracy_collapsed": _accuracy(evals["collapsed"])["avg"]},
            "points": {name: {"entropy": diag[name]["entropy"]["mean"], "accuracy": _accuracy(evals[name])["avg"],
                              "pass@k": _accuracy(evals[name])["pass@k"],
                              "decision_entropy": _decision(diag[name])[0],
                              "other_entropy": _decision(diag[name])[1]}
                       for name in diag},
            "arms": arms,
        }

    def arm_summary(self, arm: str, seed_runs: list[dict], diag: dict, evals: dict) -> dict:
        """One arm: its starting point against the collapsed checkpoint, its accuracy before continued RL, and
        after it over the seeds (mean, spread and each seed's)."""
        point = "collapsed" if arm in ("continued-rl", "rollout-temperature", "thermostat") else arm
        row = _start_row(point, diag[point], str(self.r.demo.topk), f"{self.temp:g}",
                         sampled_at_temp=arm == "rollout-temperature")
        before = _accuracy(evals[point])
        per_seed = [_seed_row(r) for r in seed_runs]
        start_at, start_other = _decision(diag[point])
        acc_mean, acc_std = _spread([p["accuracy"] for p in per_seed])
        pk_mean, pk_std = _spread([p["pass@k"] for p in per_seed])
        return {
            "title": ARM_TITLES[arm], **row,
            "accuracy_before": before["avg"], "pass@k_before": before["pass@k"], "k": before["k"],
            "accuracy_after": acc_mean, "accuracy_after_std": acc_std,
            "accuracy_after_per_seed": [p["accuracy"] for p in per_seed],
            "pass@k_after": pk_mean, "pass@k_after_std": pk_std,
            "zero_variance_groups_last_quarter": _spread([p["zero_variance_groups_last_quarter"]
                                                          for p in per_seed])[0],
            "decision_entropy_start": start_at, "other_entropy_start": start_other,
            "decision_entropy_end": _spread([p["decision_entropy"] for p in per_seed])[0],
            "other_entropy_end": _spread([p["other_entropy"] for p in per_seed])[0],
            "per_seed": per_seed,
            # (the curves of the earlier summary format, kept for scripts that read them)
            "curves": [{"seed": p["seed"], "entropy": p["entropy"], "reward": p["reward"],
                        "val_accuracy": p["val_accuracy"]} for p in per_seed],
        }

    def write(self, summary: dict) -> None:
        if self.r.output.plots:
            summary["plots"] = plot(summary, self.out)
        files = {"summary.json": json.dumps(json_safe(summary), indent=2) + "\n", "summary.md": markdown(summary)}
        for name, text in files.items():
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)


def _accuracy(ev: dict) -> dict:
    m = ev["macro"]
    kmax = max(m["pass@k"], key=int)  # pass@n: solved by at least one of the n samples
    return {"avg": m["accuracy"], "pass@k": m["pass@k"][kmax], "k": int(kmax)}


def _start_row(point: str, rep: dict, k: str, temp_key: str, sampled_at_temp: bool = False) -> dict:
    """A starting point's diagnose report (`rep`) against the collapsed checkpoint: entropy, top-k overlap, CKA."""
    ref = rep.get("reference") or {}
    cka = ref.get("cka") or []
    return {
        "start": point,
        "entropy": rep["temperature_entropy"][temp_key] if sampled_at_temp else rep["entropy"]["mean"],
        "topk_jaccard": ref.get("topk_jaccard", {}).get(k, 1.0),
        "top1_agreement": ref.get("top1_agreement", 1.0),
        "cka_last_layer": cka[-1] if cka else 1.0,
        "cka_mean": sum(cka) / len(cka) if cka else 1.0,
    }


def _spread(xs: list) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    return (statistics.fmean(xs) if xs else None, statistics.stdev(xs) if len(xs) > 1 else None)


def _decision(rep: dict) -> tuple[float | None, float | None]:
    dp = rep.get("decision_points") or {}
    return dp.get("entropy"), dp.get("other_entropy")


def _seed_row(r: dict) -> dict:
    """One continued-RL run: its final accuracy and entropies, and its curves from the run's metrics."""
    a = _accuracy(r["eval"])
    m = r["metrics"]
    train_rows = [x for x in m if "step_seconds" in x]
    zv = [(x["step"], x["zero_variance_groups"]) for x in train_rows if "zero_variance_groups" in x]
    tail = [v for _, v in zv[len(zv) * 3 // 4:]]
    at, other = _decision(r["diagnose"])
    val_rows = [x for x in m if x.get("val_accuracy") is not None]
    kmax = lambda d: d[max(d, key=int)] if d else None  # noqa: E731
    return {
        "seed": r["seed"], "accuracy": a["avg"], "pass@k": a["pass@k"],
        "zero_variance_groups_last_quarter": statistics.fmean(tail) if tail else None,
        "decision_entropy": at, "other_entropy": other,
        "thermostat_phases": (r["thermostat"] or {}).get("count"),
        "val_accuracy": [(x["step"], x["val_accuracy"]) for x in val_rows],
        "val_pass@k": [(x["step"], kmax(x.get("val_pass@k") or {})) for x in val_rows],
        "zero_variance_groups": zv,
        "entropy": [(x["step"], x["entropy"]) for x in train_rows if "entropy" in x],
        "reward": [(x["step"], x["reward"]) for x in train_rows if "reward" in x],
    }


def markdown(s: dict) -> str:
    c = s["collapse"]
    f = lambda x, n=3: "—" if x is None else f"{x:.{n}f}"  # noqa: E731
    lines = [
        "# tsopsd demo: reheating a collapsed toy policy",
        "",
        f"temp = {s['temp']:g}; seeds {s['seeds']}; accuracy = avg@n on toy test problems at temperature 1.",
        "",
        f"Collapse (rl from the toy base): mean token entropy {f(c['entropy_base'])} -> {f(c['entropy_collapsed'])} "
        f"nats ({c['entropy_ratio']:.1f}x lower), accuracy {f(c['accuracy_base'])} -> {f(c['accuracy_collapsed'])}.",
        "",
        f"| arm | start entropy | top-{s['topk']} Jaccard vs collapsed | top-1 agreement | CKA (last layer) | "
        "accuracy before | accuracy after continued RL |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a in s["arms"].items():
        after = f(a["accuracy_after"])
        if a["accuracy_after_std"] is not None:
            after += f" ± {a['accuracy_after_std']:.3f}"
        lines.append(f"| {name}: {a['title']} | {f(a['entropy'])} | {f(a['topk_jaccard'])} | "
                     f"{f(a['top1_agreement'])} | {f(a['cka_last_layer'])} | {f(a['accuracy_before'])} | {after} |")
    lines += ["", "Start entropy: mean token entropy of the starting checkpoint on its own rollouts (the "
              "rollout-temperature arm: the collapsed checkpoint's entropy at temp). Overlap, agreement and CKA are "
              "measured on those rollouts against the collapsed checkpoint.", ""]
    pm = lambda m, sd: f(m) + (f" ± {sd:.3f}" if sd is not None else "")  # noqa: E731
    k = next(iter(s["arms"].values()))["k"] if s["arms"] else "n"
    lines += ["## Over the continued-RL steps", "",
              f"| arm | accuracy after | pass@{k} after | zero-variance groups (last quarter of steps) | entropy at "
              "decision points: start → end | elsewhere: start → end | thermostat phases per seed |",
              "|---|---|---|---|---|---|---|"]
    for name, a in s["arms"].items():
        phases = [p["thermostat_phases"] for p in a["per_seed"]] if name == "thermostat" else None
        lines.append(f"| {name} | {pm(a['accuracy_after'], a['accuracy_after_std'])} | "
                     f"{pm(a['pass@k_after'], a.get('pass@k_after_std'))} | "
                     f"{f(a['zero_variance_groups_last_quarter'])} | {f(a['decision_entropy_start'], 4)} → "
                     f"{f(a['decision_entropy_end'], 4)} | {f(a['other_entropy_start'], 4)} → "
                     f"{f(a['other_entropy_end'], 4)} | {phases if phases is not None else '—'} |")
    lines += ["", "Accuracy and pass@k: eval of each arm's final checkpoint (mean ± standard deviation over seeds). "
              "Zero-variance groups: share of sampled groups whose rewards were all equal. Entropy at decision "
              "points (the toy world's plan letter) vs every other token: diagnose of the starting checkpoint and "
              "of each final checkpoint (mean over seeds), on their own rollouts at temperature 1.", "",
              "| arm | seed | accuracy | pass@k | zero-variance (last quarter) | entropy at decision points |",
              "|---|---|---|---|---|---|"]
    for name, a in s["arms"].items():
        for p in a["per_seed"]:
            lines.append(f"| {name} | {p['seed']} | {f(p['accuracy'])} | {f(p['pass@k'])} | "
                         f"{f(p['zero_variance_groups_last_quarter'])} | {f(p['decision_entropy'], 4)} |")
    lines.append("")
    if s.get("plots"):
        lines += [f"![{p}]({p})" for p in s["plots"]] + [""]
    return "\n".join(lines)


def plot(s: dict, out: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    files = []
    for key, ylabel, fname in (("entropy", "token entropy (nats)", "entropy.png"),
                               ("val_accuracy", "validation accuracy", "accuracy.png"),
                               ("val_pass@k", "validation pass@k", "pass_at_k.png"),
                               ("zero_variance_groups", "zero-variance groups", "zero_variance.png")):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, a in s["arms"].items():
            for i, c in enumerate(a["per_seed"]):
                pts = [(x, y) for x, y in c[key] if y is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, label=name if i == 0 else None, color=f"C{list(s['arms']).index(name)}",
                            alpha=0.9 if len(a["curves"]) == 1 else 0.6)
        ax.set_xlabel("continued-RL step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = out / f".{fname}.tmp.png"
        fig.savefig(tmp, dpi=110)
        tmp.replace(out / fname)
        plt.close(fig)
        files.append(fname)
    return files


def run_demo(recipe: DemoRecipe, progress: Progress = NULL, resume: bool = False, restart: bool = False) -> dict:
    from tsopsd_cli import launch

    if launch.several_processes():
        from tsopsd_cli.errors import UsageError

        raise UsageError("tsopsd demo runs in one process (it is the CPU miniature of the study); launch rl and "
                         "reheat with torchrun for several processes (docs/cluster.md)")
    demo = Demo(recipe, progress, resume, restart)
    try:
        if demo.rundir.complete:
            summary = json.loads((demo.out / "summary.json").read_text())
            summary["out"] = str(demo.rundir.finish())
            return summary
        return demo.run()
    except Interrupted as e:
        raise Interrupted(f"{e}; the demo continues from there with the same command and --resume") from None
    finally:
        demo.rundir.close()

