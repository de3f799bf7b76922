"""`tsopsd demo` end to end on a shrunken recipe (two whole pipelines: slow), through `main(argv)` in this process;
the run that a SIGTERM stops is a process of its own."""

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
    "continued": TINY_RL,
    "diagnose": {"data.num_prompts": 4, "rollout.num_generations": 2, "rollout.max_new_tokens": 8},
    "eval": {"eval.toy_num_problems": 4, "rollout.num_generations": 2, "rollout.max_new_tokens": 8},
}


def shrunken_demo_recipe() -> dict:
    """The shipped recipes/demo/toy.yaml, every stage shrunk to a smoke run, two seeds."""
    tree = yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes" / "demo" / "toy.yaml").read_text())
    for stage, extra in SHRINK.items():
        tree[stage]["set"] = {**(tree[stage].get("set") or {}), **extra}
    tree["demo"]["seeds"] = [0, 1]
    return tree


@pytest.mark.slow
def test_demo_runs_every_arm_writes_a_summary_and_resumes(tmp_path):
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump(shrunken_demo_recipe()))
    out = tmp_path / "demo"
    r = run_main("demo", "--recipe", str(recipe), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # --json: exactly one JSON object
    assert set(summary["arms"]) == {"continued-rl", "rollout-temperature", "ts-opsd", "fold", "thermostat"}
    for name, arm in summary["arms"].items():
        assert len(arm["accuracy_after_per_seed"]) == 2 and arm["accuracy_after_std"] is not None
        assert 0 <= arm["accuracy_before"] <= 1 and 0 <= arm["topk_jaccard"] <= 1 and arm["entropy"] > 0
        assert [c["seed"] for c in arm["curves"]] == [0, 1] and arm["curves"][0]["entropy"]
        # per arm and seed: accuracy and pass@k, curves over the continued steps, zero-variance groups, entropy at
        # the toy world's decision points vs elsewhere (start and end), mean and spread over seeds
        assert [p["seed"] for p in arm["per_seed"]] == [0, 1] and arm["pass@k_after_std"] is not None
        for p in arm["per_seed"]:
            assert 0 <= p["accuracy"] <= p["pass@k"] <= 1
            assert p["val_accuracy"] and p["val_pass@k"] and p["zero_variance_groups"]
            assert 0 <= p["zero_variance_groups_last_quarter"] <= 1
            assert p["decision_entropy"] is not None and p["other_entropy"] is not None
            assert (p["thermostat_phases"] is not None) == (name == "thermostat")
        assert arm["decision_entropy_start"] is not None and arm["decision_entropy_end"] is not None
    assert summary["arms"]["continued-rl"]["topk_jaccard"] == 1.0  # it starts from the collapsed checkpoint
    assert summary["arms"]["fold"]["top1_agreement"] > 0.99  # dividing logits by tau keeps every argmax
    assert json.loads((out / "summary.json").read_text())["arms"].keys() == summary["arms"].keys()
    md = (out / "summary.md").read_text()
    assert "| ts-opsd" in md and "| fold" in md and "| thermostat" in md and "## Over the continued-RL steps" in md
    assert summary["points"]["base"]["decision_entropy"] is not None
    for d in ("base", "collapsed", "ts-opsd", "fold", "arms/fold/seed-1", "eval/fold-seed-1"):
        assert (out / d).is_dir(), d

    again = run_main("demo", "--recipe", str(recipe), "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and again.stderr.count("\n") == 1


@pytest.mark.slow
def test_an_interrupted_demo_resumes_keeping_its_finished_stages(cli, tmp_path):
    recipe = tmp_path / "demo.yaml"
    tree = shrunken_demo_recipe()
    tree["demo"]["seeds"] = [0]
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / "demo"
    # SIGTERM at the third training setup: the first continued-RL arm, after every earlier stage finished; the
    # first try passes --overwrite and the resume does not (the output settings are not part of what must match)
    r = cli("demo", "--recipe", str(recipe), "--out", str(out), "--overwrite", env={"TSOPSD_FAULT": "TERM@setup#3"})
    assert r.returncode == 130, r.stderr[-3000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("tsopsd: error:")]
    assert len(errors) == 1 and "--resume" in errors[0] and "Traceback" not in r.stderr
    partial = tmp_path / ".demo.partial"
    assert not out.exists() and (partial / "collapsed" / "model.safetensors").is_file()
    stamp = (partial / "collapsed" / "model.safetensors").stat().st_mtime_ns
    plain = run_main("demo", "--recipe", str(recipe), "--out", str(out))
    assert plain.returncode == 2 and "pass --resume" in plain.stderr
    resumed = run_main("demo", "--recipe", str(recipe), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continued-rl" in resumed.stdout and "done before, kept" in resumed.stderr
    assert (out / "collapsed" / "model.safetensors").stat().st_mtime_ns == stamp  # nothing was redone
    summary = json.loads((out / "summary.json").read_text())
    # the stages the first invocation finished keep their times; total_seconds adds up every stage
    assert {"toy init", "rl until collapse", "continued RL: continued-rl, seed 0"} <= summary["stage_seconds"].keys()
    assert summary["total_seconds"] == pytest.approx(sum(summary["stage_seconds"].values()), abs=0.2)
    assert summary["seconds"] < summary["total_seconds"]
    assert not partial.exists() and not (tmp_path / ".demo.lock").exists()


def test_demo_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, msg in ((["--seeds", "a,b"], "--seeds: expected comma-separated integers"),
                      (["--resume"], "--resume: no unfinished demo at"),
                      (["--temp", "0.5"], "demo.temp: Input should be greater than 1")):
        assert msg in one_error_line(run_main("demo", "--out", str(tmp_path / "d"), *args))
        assert not (tmp_path / "d").exists()
