"""`tsopsd demo`: the study's claim tested in miniature on the toy world (docs/demo.md has the design).

    base (toy init) -> collapsed (rl on the natural mix)
    calibration (training problems, calibration seed): each arm's free setting by one rule
    per seed: ts-opsd's reheat; continued RL (the exploration-bound setting) for every arm and the base control;
              every start and end evaluated at several temperatures; representation comparisons
    summary: controls, paired statistics, verdict (runners/demo_report.py)

Every stage is an ordinary tsopsd run (the same runners as the commands) writing into its own folder, each
atomically, inside the demo's run directory (tsopsd_cli.rundir: `.OUT.partial/` until the summary is written,
then renamed to --out). Independent runs go side by side, one thread each (runners/jobs.py). With --resume,
finished runs are kept and an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tsopsd_cli import signals
from tsopsd_cli.checkpoint import check_out
from tsopsd_cli.errors import Interrupted, UsageError
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import REMEDY_ARMS, TEMPERATURE_ARMS, DemoRecipe
from tsopsd_cli.recipe_loading import demo_stage, recipe_to_yaml
from tsopsd_cli.rundir import RunDir, run_key
from tsopsd_cli.runners.jobs import Job, default_workers, run_jobs

HERE = "tsopsd_cli.runners.demo"


# ---------------------------------------------------------------------------------------- the jobs (workers)
def _partial(target: Path) -> bool:
    return (target.parent / f".{target.name}.partial").exists()


def job_rl(recipe: dict, checkpoint: str) -> None:
    from tsopsd_cli.recipe import RLRecipe
    from tsopsd_cli.runners.rl import run_rl

    rec = RLRecipe.model_validate(recipe)
    run_rl(rec, checkpoint, resume=_partial(Path(rec.output.out)))


def job_reheat(recipe: dict, checkpoint: str) -> None:
    from tsopsd_cli.recipe import ReheatRecipe
    from tsopsd_cli.runners.reheat import run_reheat

    rec = ReheatRecipe.model_validate(recipe)
    run_reheat(rec, checkpoint, resume=_partial(Path(rec.output.out)))


def job_then(rl: dict | None, checkpoint: str, evals: list[dict], reheat: dict | None = None) -> None:
    """A run and its evaluations, each skipped when its output exists: an optional reheat of `checkpoint`, an
    optional rl run (from the reheat's output when there is one), then eval of the last output (or of
    `checkpoint`) at each recipe of `evals`."""
    from tsopsd_cli.recipe import EvalRecipe
    from tsopsd_cli.runners.evaluate import run_eval

    current = checkpoint
    for recipe, fn in ((reheat, job_reheat), (rl, job_rl)):
        if recipe is not None:
            out = Path(recipe["output"]["out"])
            if not out.exists():
                fn(recipe, current)
            current = str(out)
    for ev in evals:
        if not Path(ev["output"]["out"]).exists():
            run_eval(EvalRecipe.model_validate(ev), current)


def job_representation(collapsed: str, points: dict[str, str], temp: float, topk: int, seed: int,
                       out: str) -> None:
    """`points` {name: checkpoint} and the collapsed weights plus a random change of TS-OPSD's per-tensor norms,
    each against the collapsed checkpoint at `temp` (analysis.compare_models), on fixed rollouts of the collapsed
    checkpoint; written to `out` (JSON) atomically."""
    import torch

    from tsopsd_cli.analysis import compare_models
    from tsopsd_cli.checkpoint import load_checkpoint
    from tsopsd_cli.engines import SamplingParams, encode_prompts
    from tsopsd_cli.engines.hf import HFEngine
    from tsopsd_cli.tasks import toy

    ref = load_checkpoint(collapsed, device="cpu")
    problems = toy.make_problems("test", 64, 0)
    comps = HFEngine(ref.model, ref.tokenizer, batch_size=256).generate(
        encode_prompts(ref.tokenizer, [p.prompt for p in problems]),
        SamplingParams(num_generations=4, temperature=1.0, max_new_tokens=48, seed=0))
    seqs = [(c.prompt_ids, c.token_ids) for c in comps if c.token_ids]
    models = {name: load_checkpoint(path, device="cpu").model for name, path in points.items()}
    models["random-perturbation"] = perturbed(ref.model, models["ts-opsd-start"], seed)
    result = {}
    for name, model in models.items():
        with torch.no_grad():
            result[name] = compare_models(model, ref.model, ref.tokenizer.pad_token_id, "cpu", seqs, [1.0], [1, topk],
                                          ref_temperature=temp)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)


def perturbed(base, changed, seed: int):
    """A copy of `base` whose every tensor moved by a random direction with the norm of `changed`'s move from
    `base` (the same per-tensor change size as the reheat, in no learnt direction)."""
    import copy

    import torch

    out = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (name, p), (_, q) in zip(out.named_parameters(), changed.named_parameters(), strict=True):
            delta = (q.double() - p.double()).norm()
            direction = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.add_((direction / direction.norm().clamp_min(1e-30) * delta).to(p.dtype))
    return out


# ------------------------------------------------------------------------------------------------ the study
class Demo:
    def __init__(self, recipe: DemoRecipe, progress: Progress = NULL, resume: bool = False, restart: bool = False):
        self.r = recipe
        self.d = recipe.demo
        self.progress = progress
        self.final = Path(recipe.output.out or "runs/demo")
        check_out(self.final, recipe.output.overwrite)
        self.rundir = RunDir(self.final, key=run_key(recipe), log_name="stages.jsonl", resume=resume,
                             restart=restart, what="demo", overwrite=recipe.output.overwrite)
        self.out = self.rundir.path  # every stage works in here until the whole demo is done
        (self.out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        self.workers = self.d.workers or default_workers()

    # ------------------------------------------------------------------ building blocks
    def recipe(self, stage: str, command: str, out: Path, **extra) -> dict:
        return demo_stage(self.r, stage, command, **{"output.out": str(out), **extra}).model_dump(mode="json")

    def jobs(self, title: str, jobs: list[Job]) -> None:
        """Run `jobs` side by side; their times go to the stage log."""
        if not jobs:
            return
        # (a target is how a finished job is recognised: two jobs writing one would skip each other)
        assert len({j.target for j in jobs}) == len(jobs), f"{title}: two jobs write the same output"
        signals.check(f"the demo, before {title}")
        self.progress.log(f"[demo] {title}: {len(jobs)} runs, {min(self.workers, len(jobs))} at a time")
        t0 = time.time()
        with self.progress.task(title, total=len(jobs)) as advance:
            seconds = run_jobs(jobs, self.workers, lambda m: self.progress.log(f"[demo] {m}"), advance)
        self.rundir.log.append([{"stage": name, "seconds": s} for name, s in seconds.items()])
        if seconds:  # the phase's wall time (its runs went side by side)
            self.rundir.log.append([{"phase": title, "seconds": round(time.time() - t0, 2)}])

    def continued(self, out: Path, *, seed: int, steps: int | None = None, validation_split: str = "test",
                  **extra) -> dict:
        """The continued stage's recipe for one run: the budget (or `steps`), validation every B / eval_points
        steps on the stranded family (training runs of the calibration: its train split, with the natural mix)."""
        d = self.d
        sets = {} if validation_split == "test" else {
            "validation.toy_split": "train", "validation.benchmarks": ["toy-bracket", "toy"], "validation.limit": 128}
        return self.recipe("continued", "rl", out, **{"train.max_steps": steps or d.budget_steps,
                                                      "train.eval_every": d.budget_steps // d.eval_points,
                                                      "train.seed": seed, **sets, **extra})

    def evals(self, folder: Path) -> list[dict]:
        """Evaluations of one checkpoint at every temperature of the design, into folder/eval-T<t>."""
        return [self.recipe("eval", "eval", folder / f"eval-T{t:g}", **{
            "rollout.temperature": t, "rollout.num_generations": self.d.eval_samples}) for t in self.d.temperatures]

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        from tsopsd_cli.runners import demo_report

        started = time.time()
        o = self.out
        base, collapsed = o / "base", o / "collapsed"
        self.jobs("base and collapse", [
            Job("toy init", base, f"{HERE}:job_toy_init", {"recipe": self.recipe("init", "toy-init", base)}),
        ])
        self.jobs("collapse", [Job("rl until collapse", collapsed, f"{HERE}:job_rl",
                                   {"recipe": self.recipe("collapse", "rl", collapsed), "checkpoint": str(base)})])
        settings = self.calibrate(collapsed)
        runs = self.study(base, collapsed, settings)
        summary = demo_report.summarize(self.r, o, settings, runs)
        summary["seconds"] = round(time.time() - started, 1)  # this invocation
        # every run's time and every phase's wall time from the stage log, those of an earlier (interrupted)
        # invocation included: total_seconds is the wall time of every phase, side-by-side runs counted once
        rows = self.rundir.log.rows()
        summary["stage_seconds"] = {row["stage"]: row["seconds"] for row in rows if "stage" in row}
        phases: dict[str, float] = {}
        for row in rows:
            if "phase" in row:
                phases[row["phase"]] = round(phases.get(row["phase"], 0.0) + row["seconds"], 2)
        summary["phase_seconds"] = phases
        summary["total_seconds"] = round(sum(summary["phase_seconds"].values()), 2)
        demo_report.write(summary, o, plots=self.r.output.plots)
        summary["out"] = str(self.rundir.finish(before_rename=lambda: signals.check("the demo's finish")))
        return summary

    # ------------------------------------------------------------------ calibration
    def candidates(self) -> dict[str, list[dict]]:
        """Each arm's candidate settings (as recipe overrides of its runs): a temperature from demo.temps for the
        temperature arms, one of demo.candidates for the remedies."""
        out: dict[str, list[dict]] = {}
        for arm in study_arms(self.d.arms):
            if arm in TEMPERATURE_ARMS:
                out[arm] = [{"temp": t} for t in self.d.temps]
            elif arm in REMEDY_ARMS:
                out[arm] = list(self.d.candidates[arm])
        return out

    def calibrate(self, collapsed: Path) -> dict:
        """Each arm's setting, chosen before any arm of the study runs, by one rule on training problems with the
        calibration seed (docs/demo.md): the candidate with the largest stranded-family accuracy AUC over the
        budget whose natural-mix accuracy at the end stays within demo.forgetting_tolerance of continued-rl's. An
        arm with one candidate takes it (nothing to choose, nothing run)."""
        from tsopsd_cli.runners.demo_report import choose

        cands = {arm: c for arm, c in self.candidates().items() if len(c) > 1}
        chosen = {arm: {"setting": c[0], "candidates": None} for arm, c in self.candidates().items() if len(c) == 1}
        if not cands:
            return chosen
        cal, seed = self.out / "calibration", self.d.calibration_seed
        self.jobs("calibration reheats", [
            Job(f"calibration reheat at {c['temp']:g}", cal / f"start-reheat-T{c['temp']:g}", f"{HERE}:job_reheat",
                {"recipe": self.reheat_recipe(cal / f"start-reheat-T{c['temp']:g}", c["temp"], seed),
                 "checkpoint": str(collapsed)})
            for c in cands.get("ts-opsd", [])] + [
            Job(f"calibration fold at {c['temp']:g}", cal / f"start-fold-T{c['temp']:g}", f"{HERE}:job_reheat",
                {"recipe": self.fold_recipe(cal / f"start-fold-T{c['temp']:g}", c["temp"]),
                 "checkpoint": str(collapsed)})
            for c in cands.get("fold", [])])
        runs = {"continued-rl": [cal / "continued-rl"]}
        jobs = [Job("calibration: continued-rl", cal / "continued-rl", f"{HERE}:job_rl",
                    {"recipe": self.continued(cal / "continued-rl", seed=seed, validation_split="train"),
                     "checkpoint": str(collapsed)})]
        for arm, options in cands.items():
            for i, option in enumerate(options):
                out = cal / f"{arm}-{i}"
                start, extra = self.start_of(arm, option, collapsed, cal, calibration=True)
                jobs.append(Job(f"calibration: {arm} #{i}", out, f"{HERE}:job_rl",
                                {"recipe": self.continued(out, seed=seed, validation_split="train", **extra),
                                 "checkpoint": str(start)}))
                runs.setdefault(arm, []).append(out)
        self.jobs("calibration runs", jobs)
        chosen.update(choose(cands, runs, self.d.forgetting_tolerance))
        (self.out / "calibration.json").write_text(json.dumps(chosen, indent=1) + "\n")
        return chosen

    def reheat_recipe(self, out: Path, temp: float, seed: int) -> dict:
        return self.recipe("reheat", "reheat", out, **{"reheat.temp": temp, "train.seed": seed})

    def fold_recipe(self, out: Path, temp: float) -> dict:
        return self.recipe("reheat", "reheat", out, **{"reheat.method": "fold", "reheat.temp": temp})

    def start_of(self, arm: str, setting: dict, collapsed: Path, folder: Path, calibration: bool = False,
                 seed: int | None = None) -> tuple[Path, dict]:
        """(the checkpoint an arm's continued RL starts from, the overrides of its runs) for one setting."""
        if arm == "ts-opsd":
            where = folder / (f"start-reheat-T{setting['temp']:g}" if calibration else f"reheat/seed-{seed}")
            return where, {}
        if arm == "fold":
            return folder / (f"start-fold-T{setting['temp']:g}" if calibration else "fold"), {}
        if arm == "rollout-temperature":
            return collapsed, {"rollout.temperature": setting["temp"]}
        return collapsed, dict(setting)

    # ------------------------------------------------------------------ the study's runs
    def study(self, base: Path, collapsed: Path, settings: dict) -> dict:
        """Every arm's runs for every seed (and the base control's); returns where each run's outputs are."""
        o, d = self.out, self.d
        ts, fold = settings["ts-opsd"]["setting"]["temp"], (settings.get("fold") or {}).get("setting")
        reheat_jobs = [Job(f"reheat (TS-OPSD), seed {s}", o / "reheat" / f"seed-{s}", f"{HERE}:job_then", {
            "rl": None, "checkpoint": str(collapsed), "evals": self.evals(o / "reheat" / f"seed-{s}-start"),
            "reheat": self.reheat_recipe(o / "reheat" / f"seed-{s}", ts, s)}) for s in d.seeds]
        # (a job's target is its last output: the reheat is in, its evaluations follow it)
        reheat_jobs = [Job(j.name, Path(j.kwargs["evals"][-1]["output"]["out"]), j.fn, j.kwargs) for j in reheat_jobs]
        if fold is not None:
            reheat_jobs.append(Job("reheat (fold)", o / "fold-start" / f"eval-T{d.temperatures[-1]:g}",
                                   f"{HERE}:job_then", {"rl": None, "checkpoint": str(collapsed),
                                                        "evals": self.evals(o / "fold-start"),
                                                        "reheat": self.fold_recipe(o / "fold", fold["temp"])}))
        for name, ckpt in (("base", base), ("collapsed", collapsed)):
            reheat_jobs.append(Job(f"eval {name}", o / f"{name}-start" / f"eval-T{d.temperatures[-1]:g}",
                                   f"{HERE}:job_then", {"rl": None, "checkpoint": str(ckpt),
                                                        "evals": self.evals(o / f"{name}-start")}))
        self.jobs("reheats and starting points", reheat_jobs)
        runs: dict[str, dict[int, Path]] = {}
        jobs = []
        for arm in study_arms(d.arms):
            for s in d.seeds:
                out = o / "arms" / arm / f"seed-{s}"
                runs.setdefault(arm, {})[s] = out
                jobs.append(self.arm_job(arm, s, out, base, collapsed, settings))
        self.jobs("continued RL", jobs)
        self.jobs("representation", [Job(f"representation, seed {s}", o / "representation" / f"seed-{s}.json",
                                         f"{HERE}:job_representation", {
            "collapsed": str(collapsed), "temp": ts, "topk": d.topk, "seed": s,
            "out": str(o / "representation" / f"seed-{s}.json"),
            "points": {"ts-opsd-start": str(o / "reheat" / f"seed-{s}"),
                       "continued-rl-end": str(runs["continued-rl"][s] / "run")}}) for s in d.seeds])
        return runs

    def arm_job(self, arm: str, seed: int, out: Path, base: Path, collapsed: Path, settings: dict) -> Job:
        o = self.out
        if arm == "base-control":
            start, extra, steps = base, {}, None
        elif arm in ("continued-rl", "continued-rl-matched"):
            start, extra = collapsed, {}
            steps = self.matched_steps(seed) if arm == "continued-rl-matched" else None
        else:
            start, extra = self.start_of(arm, settings[arm]["setting"], collapsed, o, seed=seed)
            steps = None
        return Job(f"continued RL: {arm}, seed {seed}", out / f"eval-T{self.d.temperatures[-1]:g}",
                   f"{HERE}:job_then", {"rl": self.continued(out / "run", seed=seed, steps=steps, **extra),
                                        "checkpoint": str(start), "evals": self.evals(out)})

    def matched_steps(self, seed: int) -> int:
        """continued-rl-matched's budget: B plus the steps whose rollouts equal this seed's TS-OPSD reheat's."""
        report = json.loads((self.out / "reheat" / f"seed-{seed}" / "report.json").read_text())
        rec = report["recipe"]
        reheat_rollouts = report["steps"] * rec["train"]["prompts_per_step"] * rec["rollout"]["num_generations"]
        cont = self.continued(self.out / "unused", seed=seed)
        per_step = cont["train"]["prompts_per_step"] * cont["rollout"]["num_generations"]
        return self.d.budget_steps + math.ceil(reheat_rollouts / per_step)


def study_arms(arms: list[str]) -> list[str]:
    """The runs of the study: the base control, continued-rl (the collapsed control) and ts-opsd always; then the
    other arms asked for, in their order."""
    return list(dict.fromkeys(["base-control", "continued-rl", "ts-opsd", *arms]))


def job_toy_init(recipe: dict) -> None:
    from tsopsd_cli.recipe import ToyInitRecipe
    from tsopsd_cli.runners.toy_init import run_toy_init

    run_toy_init(ToyInitRecipe.model_validate(recipe))


def run_demo(recipe: DemoRecipe, progress: Progress = NULL, resume: bool = False, restart: bool = False) -> dict:
    from tsopsd_cli import launch

    if launch.several_processes():
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
