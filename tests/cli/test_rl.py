"""`tsopsd rl`: outputs, the non-finite guard, the thermostat, progress lines (`main(argv)` in this process; an
injected SIGTERM through the real entry point). SIGTERM + --resume from outside: tests/cli/test_faults.py; several
processes: tests/cli/test_parallel.py."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import one_error_line, run_cli, run_main

SMALL = ["--set", "data.num_prompts=64", "--prompts-per-step", "4", "--num-generations", "4",
         "--max-new-tokens", "12", "--set", "validation.limit=8", "--set", "validation.num_generations=2",
         "--set", "validation.max_new_tokens=12", "--lr", "1e-3", "--set", "train.micro_batch_size=8",
         "--set", "grpo.reward=tests.rewards:even_length"]
TIMING = {"rollout_seconds", "train_seconds", "tokens_per_s", "step_seconds"}


def steps(path):
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_rl_writes_a_loadable_checkpoint_with_log_and_report(tiny_ckpt, tmp_path):
    out = tmp_path / "rl"
    p = run_main("rl", str(tiny_ckpt), "--out", str(out), "--max-steps", "2", *SMALL, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["steps"] == 2 and r["out"] == str(out)
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tsopsd.json", "report.json", "metrics.jsonl",
            "recipe.yaml", "curves.png"} <= names
    rows = steps(out)
    assert [x["step"] for x in rows] == [0, 1, 2, 2]  # validation, two steps, final validation
    for key in ("reward", "entropy", "response_length", "clip_frac_low", "clip_frac_high", "kl_old", "grad_norm",
                "zero_variance_groups", "sampling_entropy"):
        assert key in rows[1], key
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    prov = json.loads((out / "tsopsd.json").read_text())
    assert prov["command"] == "rl" and prov["source_checkpoint"] == str(tiny_ckpt)
    assert not list(tmp_path.glob(".*"))
    line = one_error_line(run_main("rl", str(tiny_ckpt), "--out", str(out), "--max-steps", "1", *SMALL))
    assert "already exists" in line


def test_non_finite_loss_stops_with_exit_3_before_the_update(tiny_ckpt, tmp_path):
    # (a reward function returning NaN made this loss once; that is now the reward's own error, exit 7)
    out = tmp_path / "nan"
    p = run_main("rl", str(tiny_ckpt), "--out", str(out), "--max-steps", "2", *SMALL,
                 "--set", "validation.enabled=false", "--quiet", env={"TSOPSD_FAULT": "NAN@step#1"})
    line = one_error_line(p, code=3)
    assert "non-finite loss" in line and "step 1" in line and "before the update" in line
    assert not out.exists()  # nothing published; no checkpoint with NaN weights (tests/cli/test_faults.py keeps
    assert not (tmp_path / ".nan.partial" / "checkpoints").exists()  # earlier good ones)


def test_bad_reward_spec_is_a_usage_error(tiny_ckpt, tmp_path):
    line = one_error_line(run_main("rl", str(tiny_ckpt), "--out", str(tmp_path / "x"), *SMALL,
                                   "--set", "grpo.reward=nope.nothing:fn"))
    assert "grpo.reward: cannot import" in line


THERMO = ["--set", "validation.enabled=false", "--set", "train.save_every=1", "--set", "optim.eps=1.0",
          "--max-steps", "8"]


def test_a_thermostat_that_never_fires_gives_exactly_the_plain_run(tiny_ckpt, tmp_path):
    plain = run_main("rl", str(tiny_ckpt), "--out", str(tmp_path / "plain"), *SMALL, *THERMO[:-2], "--max-steps", "3")
    assert plain.returncode == 0, plain.stderr
    never = run_main("rl", str(tiny_ckpt), "--out", str(tmp_path / "never"), *SMALL, *THERMO[:-2], "--max-steps", "3",
                     "--set", "thermostat.enabled=true", "--set", "thermostat.threshold=0.0001",
                     "--set", "thermostat.window=1", "--set", "thermostat.min_gap=1", "--json")
    assert never.returncode == 0, never.stderr
    assert steps(tmp_path / "plain") == steps(tmp_path / "never")
    assert all(r["phase"] == "grpo" for r in steps(tmp_path / "never"))
    assert json.loads(never.stdout)["thermostat"]["count"] == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "never" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["frozen", "ema"])
def test_the_thermostat_reheats_and_a_resume_inside_a_phase_equals_the_uninterrupted_run(teacher, tiny_ckpt,
                                                                                         tmp_path):
    # a threshold above any entropy: fires as soon as the window (2) and the gap (2) allow, i.e. after step 2;
    # phases of at most 2 steps, then GRPO again for 2 steps, then the next phase
    fire = ["--set", "thermostat.enabled=true", "--set", "thermostat.threshold=100", "--set", "thermostat.window=2",
            "--set", "thermostat.min_gap=2", "--set", "thermostat.max_phase_steps=2",
            "--set", "thermostat.target_entropy_ratio=null", "--set", "thermostat.target_entropy=1000",
            "--set", f"thermostat.teacher={teacher}", "--set", "thermostat.teacher_ema_decay=0.5"]
    full = tmp_path / "full"
    p = run_main("rl", str(tiny_ckpt), "--out", str(full), *SMALL, *THERMO, *fire, "--json")
    assert p.returncode == 0, p.stderr
    rows = steps(full)
    assert [r["phase"] for r in rows] == ["grpo", "grpo", "reheat", "reheat", "grpo", "grpo", "reheat", "reheat"]
    report = json.loads(p.stdout)["thermostat"]
    assert report["count"] == 2 and [(x["first_step"], x["last_step"]) for x in report["phases"]] == [(3, 4), (7, 8)]
    for r in rows:
        if r["phase"] == "reheat":
            assert r["student_entropy"] > 0 and r["teacher_entropy"] > r["student_entropy"] * 0.5 and "reward" not in r
    cut = tmp_path / "cut"  # SIGTERM at the 3rd step: the first step of the first phase
    p = run_cli("rl", str(tiny_ckpt), "--out", str(cut), *SMALL, *THERMO, *fire, "--quiet",
                env={"TSOPSD_FAULT": "TERM@step#3"})
    assert p.returncode == 130, p.stderr
    saved = tmp_path / ".cut.partial" / "checkpoints" / "step-000003"
    assert (saved / "snapshot").is_dir() and (saved / "ema_teacher").is_dir() == (teacher == "ema")  # its teachers
    p = run_main("rl", str(tiny_ckpt), "--out", str(cut), *SMALL, *THERMO, *fire, "--resume")
    assert p.returncode == 0, p.stderr
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING | {"weight_sync_seconds"}} for r in rs]  # noqa
    a, b = strip(steps(full)), strip(steps(cut))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            want = pytest.approx(y[k], rel=1e-5, abs=1e-7) if isinstance(x[k], float) else y[k]
            assert x[k] == want, (x["step"], k)


def test_a_log_gets_plain_progress_lines_and_quiet_silences_them(tiny_ckpt, tmp_path):
    """stderr not a terminal (a cluster log): plain lines with step/total, metrics, elapsed and ETA, also with
    --json (stdout keeps its one object); --quiet: none."""
    args = ["rl", str(tiny_ckpt), "--max-steps", "3", *SMALL, "--set", "validation.enabled=false"]
    p = run_main(*args, "--out", str(tmp_path / "a"), "--json", env={"TSOPSD_LOG_EVERY": "0"})
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)
    lines = [x for x in p.stderr.splitlines() if "] rl" in x]
    assert any("rl: started, 3 to do" in x for x in lines)
    steps = [x for x in lines if " rl  " in x]
    assert len(steps) >= 3 and "1/3" in steps[0] and "reward" in steps[0] and "elapsed" in steps[0]
    assert any("eta" in x for x in steps) and steps[-1].endswith("done")
    q = run_main(*args, "--out", str(tmp_path / "b"), "--quiet", env={"TSOPSD_LOG_EVERY": "0"})
    assert q.returncode == 0 and q.stderr == ""
