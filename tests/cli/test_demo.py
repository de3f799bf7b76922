"""`tsopsd demo` end to end on a shrunken study (whole pipelines: slow), through `main(argv)` in this process; the
run that a SIGTERM stops is a process of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import one_error_line, run_main

TINY_RL = {"train.max_steps": 2, "train.prompts_per_step": 2, "rollout.num_generations": 2,
           "rollout.max_new_tokens": 8, "rollout.batch_size": 8, "validation.limit": 4,
           "validation.num_generations": 2, "validation.max_new_tokens": 8, "train.eval_every": 0,
           "train.save_every": 0, "train.micro_batch_size": 4}
SHRINK = {
    "init": {"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64,
             "train.steps": 5, "train.eval_problems": 8},
    "collapse": TINY_RL,
    "reheat": {"train.max_steps": 1, "train.prompts_per_step": 2, "rollout.num_generations": 2,
               "rollout.max_new_tokens": 8, "validation.limit": 4, "validation.num_generations": 2,
               "validation.max_new_tokens": 8, "reheat.report_prompts": 4, "train.save_every": 0,
               "reheat.target_entropy_ratio": None},
    "continued": {k: v for k, v in TINY_RL.items() if k not in ("train.max_steps", "train.eval_every")},
    "eval": {"eval.toy_num_problems": 4, "rollout.max_new_tokens": 8},
}
DEMO = {"budget_steps": 2, "eval_points": 2, "temperatures": [1.0, 1.6], "eval_samples": 1}
STUDY_ARMS = {"base-control", "continued-rl", "continued-rl-matched", "rollout-temperature", "fold", "ts-opsd",
              "thermostat", "high-entropy-tokens", "entropy-adaptive"}


def shrunken_demo_recipe(**demo) -> dict:
    """The shipped recipes/demo/toy.yaml, every stage shrunk to a smoke run."""
    tree = yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes" / "demo" / "toy.yaml").read_text())
    for stage, extra in SHRINK.items():
        tree[stage]["set"] = {**(tree[stage].get("set") or {}), **extra}
    tree["demo"].update({**DEMO, **demo})
    return tree


@pytest.mark.slow
def test_the_study_runs_every_arm_side_by_side_calibrates_and_computes_a_verdict(tmp_path):
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump(shrunken_demo_recipe(
        seeds=[0, 1], workers=2, temps=[1.4, 2.0],
        candidates={"high-entropy-tokens": [{"grpo.top_entropy_quantile": q} for q in (0.2, 0.5, 1.0)]})))
    out = tmp_path / "demo"
    r = run_main("demo", "--recipe", str(recipe), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)  # --json: exactly one JSON object
    assert s["verdict"] in ("untestable", "supported", "refuted", "not separated") and s["verdict_reason"]
    assert s["design"]["seeds"] == [0, 1] and s["design"]["primary_metric"] == "stranded_accuracy_auc"
    assert set(s["arms"]) == STUDY_ARMS
    for name, arm in s["arms"].items():
        assert len(arm["primary_per_seed"]) == len(arm["escaped_per_seed"]) == len(arm["rollouts"]) == 2
        assert all(0 <= x <= 1 for x in arm["primary_per_seed"])
        assert set(arm["accuracy_by_temperature"]["end"]) == {"1", "1.6"}
        assert set(arm["accuracy_by_temperature"]["end"]["1"]) == {"toy-bracket", "toy"}
        assert len(set(arm["start_sha256_per_seed"])) == (2 if name == "ts-opsd" else 1)  # reheat re-run per seed
    rollouts = {a: v["rollouts"][0] for a, v in s["arms"].items()}
    assert rollouts["continued-rl"] == 2 * 2 * 2  # budget x prompts x samples
    reheat = 1 * 2 * 2  # its one step of 2 prompts x 2
    assert rollouts["ts-opsd"] == rollouts["continued-rl"] + reheat
    assert rollouts["continued-rl-matched"] >= rollouts["ts-opsd"]  # extra steps cover the reheat's rollouts
    assert [c["vs"] for c in s["comparisons"]] == [a for a in s["arms"] if a not in ("base-control", "ts-opsd")]
    for c in s["comparisons"]:
        assert c["arm"] == "ts-opsd" and len(c["ci"]) == 2 and 0 <= c["p"] <= c["p_holm"] <= 1
    assert set(s["controls"]) >= {"base", "collapsed", "separated", "mcnemar_p"}
    assert set(s["representation"]) == {"ts-opsd-start", "continued-rl-end", "random-perturbation"}
    # the calibration chose among several candidates on training problems, before the study's runs
    cal = json.loads((out / "calibration.json").read_text())
    assert len(cal["ts-opsd"]["candidates"]) == 2 and len(cal["high-entropy-tokens"]["candidates"]) == 3
    assert s["settings"]["ts-opsd"]["setting"] in ({"temp": 1.4}, {"temp": 2.0})
    md = (out / "summary.md").read_text()
    assert md.splitlines()[2].startswith(f"**Verdict: {s['verdict']}**") and "## Controls" in md
    for d in ("base", "collapsed", "fold", "reheat/seed-1", "arms/fold/seed-1/run", "arms/fold/seed-1/eval-T1.6",
              "calibration/start-fold-T2", "calibration/fold-1"):
        assert (out / d).is_dir(), d

    again = run_main("demo", "--recipe", str(recipe), "--out", str(out))
    assert "already exists" in one_error_line(again)


@pytest.mark.slow
def test_an_interrupted_demo_resumes_keeping_its_finished_stages(cli, tmp_path):
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump(shrunken_demo_recipe(workers=1)))
    out = tmp_path / "demo"
    # SIGTERM at the third training setup: after the collapse and the reheat, in the first continued-RL run; the
    # first try passes --overwrite and the resume does not (the output settings are not part of what must match)
    r = cli("demo", "--recipe", str(recipe), "--out", str(out), "--overwrite", env={"TSOPSD_FAULT": "TERM@setup#3"})
    assert r.returncode == 130, r.stderr[-3000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("tsopsd: error:")]
    assert len(errors) == 1 and "--resume" in errors[0] and "Traceback" not in r.stderr
    partial = tmp_path / ".demo.partial"
    assert not out.exists() and (partial / "collapsed" / "model.safetensors").is_file()
    stamp = (partial / "collapsed" / "model.safetensors").stat().st_mtime_ns
    plain = run_main("demo", "--recipe", str(recipe), "--out", str(out))
    assert "pass --resume" in one_error_line(plain)
    resumed = run_main("demo", "--recipe", str(recipe), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "verdict: untestable" in resumed.stdout and "done before, kept" in resumed.stderr
    assert (out / "collapsed" / "model.safetensors").stat().st_mtime_ns == stamp  # nothing was redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "untestable" and "do not separate" in summary["verdict_reason"]  # one seed
    assert "a verdict needs more seeds: tsopsd demo --full" in summary["verdict_reason"]
    # the stages the first invocation finished keep their times; total_seconds adds up every stage
    assert {"toy init", "rl until collapse", "reheat (TS-OPSD), seed 0"} <= summary["stage_seconds"].keys()
    # (one worker: a phase's wall time is its runs' times plus the bookkeeping between them, never less)
    runs_seconds = sum(summary["stage_seconds"].values())
    assert runs_seconds - 0.05 <= summary["total_seconds"] <= runs_seconds + 1.0
    assert summary["seconds"] < summary["total_seconds"]
    assert not partial.exists() and not (tmp_path / ".demo.lock").exists()


def test_demo_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, msg in ((["--seeds", "a,b"], "--seeds: expected comma-separated integers"),
                      (["--resume"], "--resume: no unfinished demo at"),
                      (["--temp", "0.5"], "demo.temps.0: Input should be greater than 1"),
                      (["--seeds", "0,0"], "seeds must be distinct"),
                      (["--seeds", "1000"], "calibration_seed must not be one of seeds"),
                      (["--set", "demo.budget_steps=7"], "must be a multiple of eval_points"),
                      (["--set", "demo.candidates={thermostat: [{grpo.beta: 1}]}"], "only thermostat.* fields"),
                      (["--set", "demo.candidates={high-entropy-tokens: [{grpo.top_entropy_quantile: 2}]}"],
                       "demo.candidates.high-entropy-tokens.0")):
        assert msg in one_error_line(run_main("demo", "--out", str(tmp_path / "d"), *args))
        assert not (tmp_path / "d").exists()
