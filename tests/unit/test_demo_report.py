"""runners.demo_report: the study's numbers from run outputs written here by hand, the calibration rule, the
controls and the verdict path."""

from __future__ import annotations

import json

import pytest

from tsopsd_cli.runners import demo_report as R


def write_run(path, rows, steps=4, prompts=2, gens=8):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "report.json").write_text(json.dumps({"steps": steps, "recipe": {
        "train": {"prompts_per_step": prompts}, "rollout": {"num_generations": gens}}}))
    return path


def test_auc_is_the_mean_over_the_run_by_trapezoids():
    assert R.auc([(0, 0.0), (10, 1.0)]) == pytest.approx(0.5)
    assert R.auc([(0, 0.2), (5, 0.2), (10, 0.8)]) == pytest.approx((5 * 0.2 + 5 * 0.5) / 10)
    assert R.auc([(0, 0.3), (12, 0.3), (24, 0.3)]) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        R.auc([(0, 0.5)])


def test_curves_take_the_last_value_per_step_and_a_named_set(tmp_path):
    run = write_run(tmp_path / "r", [
        {"step": 0, "val_accuracy": 0.1, "val_right_plan": 0.0, "val_by_set": {"toy-bracket": {"accuracy": 0.2,
                                                                                                 "right_plan": 0.1},
                                                                                 "toy": {"accuracy": 0.9}}},
        {"step": 1, "reward": 0.5, "step_seconds": 1.0},
        {"step": 2, "val_accuracy": 0.3, "val_by_set": {"toy-bracket": {"accuracy": 0.4}, "toy": {"accuracy": 0.8}}},
        {"step": 2, "val_accuracy": 0.35}])
    assert R.curve(run) == [(0, 0.1), (2, 0.35)]
    assert R.curve(run, set_name="toy-bracket") == [(0, 0.2), (2, 0.4)]
    assert R.curve(run, "val_right_plan", set_name="toy-bracket") == [(0, 0.1)]
    assert R.rollouts_of(run) == 4 * 2 * 8


def calibration_run(tmp_path, name, stranded, natural):
    return write_run(tmp_path / name, [
        {"step": s, "val_by_set": {"toy-bracket": {"accuracy": a}, "toy": {"accuracy": natural if s else 0.9}}}
        for s, a in zip((0, 5, 10), stranded)])


def test_the_calibration_rule(tmp_path):
    runs = {"continued-rl": [calibration_run(tmp_path, "base", (0.1, 0.1, 0.1), 0.85)],
            "ts-opsd": [calibration_run(tmp_path, "t0", (0.1, 0.3, 0.5), 0.84),   # admissible
                        calibration_run(tmp_path, "t1", (0.1, 0.6, 0.9), 0.70),   # better, but forgets
                        calibration_run(tmp_path, "t2", (0.1, 0.3, 0.5), 0.80)],  # ties t0: the first wins
            "thermostat": [calibration_run(tmp_path, "h0", (0.1, 0.2, 0.2), 0.70),
                           calibration_run(tmp_path, "h1", (0.1, 0.1, 0.1), 0.75)]}
    cands = {"ts-opsd": [{"temp": 1.2}, {"temp": 1.6}, {"temp": 2.0}], "thermostat": [{"a": 1}, {"a": 2}]}
    got = R.choose(cands, runs, tolerance=0.05)
    assert got["ts-opsd"]["setting"] == {"temp": 1.2}
    assert [c["admissible"] for c in got["ts-opsd"]["candidates"]] == [True, False, True]
    assert got["ts-opsd"]["candidates"][1]["stranded_auc"] == pytest.approx((5 * 0.35 + 5 * 0.75) / 10)
    # no candidate within the tolerance: the one that forgot least, said so
    assert got["thermostat"]["setting"] == {"a": 2} and got["thermostat"]["rule"].startswith("none admissible")


def test_controls_separate_only_with_a_significant_difference_in_escapes():
    arms = {"base-control": {"escaped_per_seed": [True] * 10, "primary_per_seed": [0.8] * 10},
            "continued-rl": {"escaped_per_seed": [False] * 10, "primary_per_seed": [0.2] * 10}}
    ctl = R.controls(arms, 0.05)
    assert ctl["separated"] and ctl["mcnemar_p"] == pytest.approx(2 / 1024)
    arms["continued-rl"]["escaped_per_seed"] = [True] * 6 + [False] * 4
    assert not R.controls(arms, 0.05)["separated"]  # 4 discordant pairs: p = 0.125
    one = {k: {"escaped_per_seed": v["escaped_per_seed"][:1], "primary_per_seed": [0.5]} for k, v in arms.items()}
    assert not R.controls(one, 0.05)["separated"]  # one seed can never separate
    # the reason says so, and what would: more seeds (demo --full); ten seeds whose runs did not separate do not
    assert "--full" in R.unseparated_reason(R.controls(one, 0.05), 1, 0.05)
    assert "whatever the runs do (at best 1)" in R.unseparated_reason(R.controls(one, 0.05), 1, 0.05)
    ten = R.unseparated_reason(R.controls(arms, 0.05), 10, 0.05)
    assert "--full" not in ten and "cannot show whether a start restores exploration" in ten
