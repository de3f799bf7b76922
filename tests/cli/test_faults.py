"""Fault injection through the real entry point: kill -9 at seeded random points and resume until done, SIGTERM at
every phase, and the defects a hostile-user audit found (each case failed before its fix). The guarantees these
tests hold are listed in docs/cli.md."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cli_command, cli_env, one_error_line, run_cli, run_main, start_cli

TIMING = {"rollout_seconds", "train_seconds", "tokens_per_s", "step_seconds"}
LINEAR = ["--set", "optim.eps=1.0"]  # see tests/cli/test_parallel.py
RL = ["rl", "--set", "data.num_prompts=64", "--prompts-per-step", "4", "--num-generations", "4",
      "--max-new-tokens", "12", "--set", "validation.limit=6", "--set", "validation.num_generations=2",
      "--set", "validation.max_new_tokens=10", "--lr", "1e-3", "--set", "train.micro_batch_size=8",
      "--set", "grpo.reward=tests.rewards:even_length", "--max-steps", "4", "--set", "train.save_every=1",
      "--set", "train.eval_every=2", *LINEAR]
REHEAT = ["reheat", "--set", "data.num_prompts=64", "--set", "train.prompts_per_step=4",
          "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=12", "--set", "validation.limit=6",
          "--set", "validation.num_generations=2", "--set", "validation.max_new_tokens=10",
          "--set", "reheat.report_prompts=3", "--set", "train.micro_batch_size=8", "--lr", "1e-3",
          "--max-steps", "4", "--set", "train.save_every=1", "--set", "train.eval_every=2", "--temp", "1.6", *LINEAR]
CMDS = {"rl": RL, "reheat": REHEAT}


def rows(out):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same(a, b):
    _rows_close(rows(a), rows(b))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


def _rows_close(ra, rb):
    assert [(r["step"], sorted(r)) for r in ra] == [(r["step"], sorted(r)) for r in rb]
    for x, y in zip(ra, rb):
        for k, v in x.items():
            if isinstance(v, float):
                assert v == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)
            else:
                assert v == y[k], (x["step"], k)
    return True


@pytest.fixture(scope="module")
def uninterrupted(tiny_ckpt, tmp_path_factory):
    outs = {}
    for name, args in CMDS.items():
        out = tmp_path_factory.mktemp("full") / name
        p = run_main(args[0], str(tiny_ckpt), *args[1:], "--out", str(out))
        assert p.returncode == 0, p.stderr
        outs[name] = out
    return outs


def steps_of(out):
    return [r["step"] for r in rows(out)]


# ---------------------------------------------------------------------------------------------- kill -9
POINTS = ["setup", "validation", "rollout", "step", "save", "finish"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rl", "reheat"])
def test_kill_9_at_seeded_random_points_then_resume_until_done_equals_the_uninterrupted_run(
        name, tiny_ckpt, tmp_path, uninterrupted):
    args = CMDS[name]
    out = tmp_path / "cut"
    rng = random.Random(f"kill-{name}")
    kills = 0
    for attempt in range(12):
        point = rng.choice(POINTS)
        # a resumed run reaches each per-step point once per step it takes: killing at its 2nd or 3rd visit lets
        # every attempt finish at least one step (at the 1st it could be killed for ever at the same place)
        nth = 1 if point in ("setup", "finish") else rng.randint(2, 3)
        resume = ["--resume"] if (tmp_path / ".cut.partial").exists() else []
        p = run_cli(args[0], str(tiny_ckpt), *args[1:], "--out", str(out), *resume,
                    env={"TSOPSD_FAULT": f"KILL@{point}#{nth}"})
        if p.returncode == 0:
            break
        assert p.returncode == -signal.SIGKILL, (point, nth, p.returncode, p.stderr[-2000:])
        assert not out.exists()  # --out only ever appears complete
        kills += 1
    else:
        pytest.fail("did not finish in 12 attempts")
    assert kills >= 2
    assert_same(uninterrupted[name], out)


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_resume_equals_the_uninterrupted_run(tiny_ckpt, tmp_path, uninterrupted):
    """Killed at a wall-clock moment (anywhere: mid-write too), resumed until done."""
    out = tmp_path / "cut"
    rng = random.Random("kill-time")
    for attempt in range(10):
        resume = ["--resume"] if (tmp_path / ".cut.partial").exists() else []
        proc = start_cli(*RL[:1], str(tiny_ckpt), *RL[1:], "--out", str(out), *resume, "--quiet")
        try:
            proc.wait(timeout=rng.uniform(3.0, 12.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode == 0:
            break
        if out.exists():  # killed after the atomic rename, before the process ended: the run is complete
            assert not (tmp_path / ".cut.partial").exists()
            break
    else:
        p = run_main(*RL[:1], str(tiny_ckpt), *RL[1:], "--out", str(out), "--resume")
        assert p.returncode == 0, p.stderr
    assert_same(uninterrupted["rl"], out)


@pytest.mark.slow
def test_kill_9_before_the_first_checkpoint_then_resume_logs_each_step_once(tiny_ckpt, tmp_path):
    out = tmp_path / "early"
    p = run_cli(*RL[:1], str(tiny_ckpt), *RL[1:], "--set", "train.save_every=0", "--max-steps", "2", "--out", str(out),
                env={"TSOPSD_FAULT": "KILL@step#2"})
    assert p.returncode == -signal.SIGKILL
    assert [r["step"] for r in rows(tmp_path / ".early.partial")] == [0, 1]
    p = run_main(*RL[:1], str(tiny_ckpt), *RL[1:], "--set", "train.save_every=0", "--max-steps", "2", "--out", str(out),
                 "--resume")
    assert p.returncode == 0, p.stderr
    assert steps_of(out) == [0, 1, 2, 2]  # validation, two steps, final validation: no duplicates


# ---------------------------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow
def test_sigterm_from_outside_saves_the_step_it_stopped_in_and_resume_equals_the_uninterrupted_run(
        tiny_ckpt, tmp_path, uninterrupted):
    """A SIGTERM sent by someone else (a scheduler), at a moment of its choosing, to a run that saves no periodic
    checkpoints: the run saves its last completed step, exits 130, refuses to start over without --resume, and
    the resumed run ends where the uninterrupted one did."""
    args = [*RL[:1], str(tiny_ckpt), *RL[1:], "--set", "train.save_every=0"]
    out = tmp_path / "cut"
    log = tmp_path / ".cut.partial" / "metrics.jsonl"
    proc = start_cli(*args, "--out", str(out))
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.05)  # the first validation and step 1 are logged: the signal lands in step 2 or later
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM received" in err and "checkpoint of step" in err and "--resume" in err
    assert not out.exists()
    assert "pass --resume" in one_error_line(run_main(*args, "--out", str(out)))
    p = run_main(*args, "--out", str(out), "--resume")
    assert p.returncode == 0, p.stderr
    assert_same(uninterrupted["rl"], out)


@pytest.mark.slow
@pytest.mark.parametrize("name,point", [("rl", "validation#1"), ("rl", "validation#2"), ("rl", "rollout#3"),
                                        ("rl", "step#2"), ("rl", "save#2"), ("rl", "finish#1"),
                                        ("reheat", "validation#2"), ("reheat", "rollout#2")])
def test_sigterm_at_each_phase_exits_130_with_one_line_and_resumes_exactly(name, point, tiny_ckpt, tmp_path,
                                                                          uninterrupted):
    args = CMDS[name]
    out = tmp_path / "cut"
    p = run_cli(args[0], str(tiny_ckpt), *args[1:], "--out", str(out), "--quiet", env={"TSOPSD_FAULT": f"TERM@{point}"})
    line = one_error_line(p, code=130)
    assert "SIGTERM received" in line and "--resume" in line
    assert not out.exists() and (tmp_path / ".cut.partial").is_dir() and not (tmp_path / ".cut.lock").exists()
    p = run_main(args[0], str(tiny_ckpt), *args[1:], "--out", str(out), "--resume")
    assert p.returncode == 0, p.stderr
    assert_same(uninterrupted[name], out)


# the remedies whose state a checkpoint carries: the adaptive entropy coefficient, the EMA teacher's weights
STEP, CMAX = 0.02, 0.05
REMEDIES = {
    "rl-adaptive-entropy": [*RL, "--set", "grpo.entropy_target=100", "--set", f"grpo.entropy_coef_step={STEP}",
                            "--set", f"grpo.entropy_coef_max={CMAX}"],
    "reheat-ema-teacher": [*REHEAT, "--set", "reheat.teacher=ema", "--set", "reheat.teacher_ema_decay=0.7"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REMEDIES))
def test_sigterm_then_resume_equals_the_uninterrupted_run_with_each_remedys_state(name, tiny_ckpt, tmp_path):
    args = REMEDIES[name]
    full = tmp_path / "full"
    p = run_cli(args[0], str(tiny_ckpt), *args[1:], "--out", str(full))
    assert p.returncode == 0, p.stderr
    cut = tmp_path / "cut"
    p = run_cli(args[0], str(tiny_ckpt), *args[1:], "--out", str(cut), "--quiet", env={"TSOPSD_FAULT": "TERM@step#3"})
    one_error_line(p, code=130)
    saved = tmp_path / ".cut.partial" / "checkpoints" / "step-000003"
    assert (saved / "ema_teacher").is_dir() == (name == "reheat-ema-teacher")
    p = run_cli(args[0], str(tiny_ckpt), *args[1:], "--out", str(cut), "--resume")
    assert p.returncode == 0, p.stderr
    assert_same(full, cut)
    if name == "rl-adaptive-entropy":  # the coefficient's trajectory, against the rule written out
        steps = [r for r in rows(full) if "reward" in r]
        assert steps[0]["entropy_coef"] == 0.0 and len(steps) == 4
        for before, after in zip(steps, steps[1:]):
            e, c = before["sampling_entropy"], before["entropy_coef"]
            moved = c + STEP if e < 100 else c - STEP if e > 100 else c
            assert after["entropy_coef"] == pytest.approx(min(max(moved, 0.0), CMAX), abs=1e-12)
        assert [r["entropy_coef"] for r in steps] == pytest.approx([0.0, 0.02, 0.04, 0.05])


@pytest.mark.slow
def test_sigterm_during_eval_exits_130_then_the_same_command_finishes(tiny_ckpt, tmp_path):
    args = ["eval", str(tiny_ckpt), "--set", "eval.toy_num_problems=12", "--set", "eval.chunk_problems=4", "-n", "2",
            "--max-new-tokens", "8", "--set", "eval.grader_workers=1"]
    full = run_main(*args, "--json")
    assert full.returncode == 0, full.stderr
    out = tmp_path / "ev"
    p = run_cli(*args, "--out", str(out), "--quiet", env={"TSOPSD_FAULT": "TERM@eval-chunk#2"})
    line = one_error_line(p, code=130)
    assert "run the same command again" in line
    rows_done = (tmp_path / ".ev.partial" / "samples.jsonl").read_text().splitlines()
    assert len(rows_done) == 4 * 2  # the first chunk is on disk
    p = run_main(*args, "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    a, b = json.loads(full.stdout), json.loads(p.stdout)
    assert a["macro"] == b["macro"]  # the resumed eval sampled exactly what an uninterrupted one did


# ------------------------------------------------------------------------------------ the audit's defects
def test_non_finite_recipe_numbers_are_refused(tiny_ckpt, tmp_path):
    for value in (".inf", "nan", "-.inf"):
        line = one_error_line(run_main(*RL[:1], str(tiny_ckpt), "--out", str(tmp_path / "x"), "--set",
                                       f"optim.lr={value}"))
        assert "optim.lr" in line and "finite" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("lr", ["1e30", "1e3"])
def test_a_diverging_update_exits_3_before_anything_is_saved(lr, tiny_ckpt, tmp_path):
    out = tmp_path / "x"
    p = run_main(*RL[:1], str(tiny_ckpt), *RL[1:], "--lr", lr, "--set", "optim.eps=1e-8", "--out", str(out),
                 "--quiet")
    line = one_error_line(p, code=3)
    assert "diverged" in line or "non-finite" in line
    assert not out.exists() and not (tmp_path / ".x.partial" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["loss", "reward"])
def test_a_non_finite_loss_or_reward_later_in_a_run_keeps_the_last_good_checkpoints(cause, tiny_ckpt, tmp_path):
    """A non-finite loss at step 3 is the non-finite guard's (exit 3); a non-finite reward at step 3 is the reward
    function's fault (exit 7, naming grpo.reward: it used to surface as a non-finite loss). Either way the
    checkpoints of steps 1 and 2 stay and --resume finishes the run."""
    (tmp_path / "late_nan.py").write_text(
        "calls = 0\n"
        "def reward(completions, answers):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    return [float('nan') if calls >= 3 else float(len(c) % 2) for c in completions]\n")
    out = tmp_path / "x"
    args = [*RL[:1], str(tiny_ckpt), *RL[1:], "--out", str(out), "--set", "validation.enabled=false", "--quiet"]
    if cause == "reward":
        args += ["--set", "grpo.reward=late_nan:reward"]
    p = run_cli(*args, env={"PYTHONPATH": str(tmp_path),
                            **({"TSOPSD_FAULT": "NAN@step#3"} if cause == "loss" else {})})
    if cause == "loss":
        line = one_error_line(p, code=3)
        assert "non-finite" in line and "step 3" in line
    else:
        line = one_error_line(p, code=7)
        assert "grpo.reward" in line and "non-finite" in line and "step 3" in line and "--resume" in line
    ckpts = sorted(p.name for p in (tmp_path / ".x.partial" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000001", "step-000002"]
    st = torch.load(tmp_path / ".x.partial" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert st["step"] == 2
    # the kept checkpoint is resumable with the same recipe (the reward's call counter restarts in a new process,
    # so the resumed steps 3 and 4 get finite rewards)
    p = run_cli(*args, "--resume", env={"PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert steps_of(out) == [1, 2, 3, 4]


def test_an_output_that_is_inside_or_contains_an_input_is_refused(tiny_ckpt, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    before = sorted(p.name for p in ck.iterdir())
    for args in (["reheat", str(ck), "--method", "fold", "--temp", "1.6", "--out", str(ck), "--overwrite"],
                 ["eval", str(ck), "--limit", "1", "--out", str(ck), "--overwrite"],
                 ["reheat", str(ck), "--method", "fold", "--out", str(ck / "sub")],
                 ["rl", str(ck), "--out", str(ck / "sub")],
                 ["diagnose", str(ck), "--reference", str(tiny_ckpt), "--out", str(tiny_ckpt.parent)]):
        line = one_error_line(run_main(*args))
        assert "the output" in line and "the input" in line, line
    assert sorted(p.name for p in ck.iterdir()) == before


def test_a_non_utf8_data_file_is_a_usage_error(tiny_ckpt, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"problem": "1+1=?", "answer": "2"}\n{"problem": "\xff\xfe", "answer": "1"}\n')
    line = one_error_line(run_main("rl", str(tiny_ckpt), "--data", str(data), "--out", str(tmp_path / "x")))
    assert "bad.jsonl" in line and "UTF-8" in line


def test_an_unwritable_output_is_refused_before_any_work(tmp_path):
    t0 = time.time()
    line = one_error_line(run_main("toy", "init", "--out", "/proc/tsopsd-no-such/base"))
    assert "cannot write" in line and time.time() - t0 < 60  # found before training, not after
    import os

    if os.geteuid() != 0:  # root writes into read-only folders; the case above covers it
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        line = one_error_line(run_main("toy", "init", "--out", str(ro / "base")))
        assert "cannot write" in line


def test_refusals_leave_nothing_behind(tiny_ckpt, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1=?", "answer": "2"}\n')
    out = tmp_path / "x"
    line = one_error_line(run_main("rl", str(tiny_ckpt), "--data", str(data), "--out", str(out)))
    assert "no field 'problem'" in line
    line = one_error_line(run_main("rl", str(tiny_ckpt), "--out", str(out), "--resume"))
    assert "--resume: no unfinished run" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # no .x.partial, no .x.lock
    i = RL.index("data.num_prompts=64")
    small = RL[1:i - 1] + RL[i + 1:]  # (a jsonl source has no num_prompts)
    p = run_main("rl", str(tiny_ckpt), *small, "--data", str(data), "--set", "data.question_field=question",
                 "--max-steps", "1", "--set", "validation.enabled=false", "--out", str(out))
    assert p.returncode == 0, p.stderr  # the corrected command is not refused


def test_remote_code_in_a_config_is_named_and_not_run(tiny_ckpt, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (ck / "config.json").write_text(json.dumps(cfg))
    # were it run (in this process), its SystemExit would pass main() and fail the test
    (ck / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    p = run_main("diagnose", str(ck), "--num-prompts", "1", "--num-generations", "1", "--max-new-tokens", "4",
                 "--json")
    assert p.returncode == 0, p.stderr
    warnings = [x for x in p.stderr.splitlines() if x.startswith("tsopsd: warning:")]
    assert len(warnings) == 1 and "auto_map" in warnings[0] and "not run" in warnings[0]


@pytest.mark.slow
def test_eval_grade_on_adversarial_completions_finishes_within_the_time_limits(tmp_path):
    from tests.unit.test_grading import adversarial_cases

    cases = adversarial_cases()
    assert len(cases) == 20
    f = tmp_path / "adv.jsonl"
    f.write_text("".join(json.dumps({"completion": c, "answer": g}) + "\n" for c, g, _ in cases))
    t0 = time.time()
    p = run_main("eval", "grade", str(f), "--timeout", "5", "--json")
    took = time.time() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["n"] == 20 and took < 20 * 5


# ------------------------------------------------------------------------------------ concurrent runs (#24)
SMALL = ["--set", "data.num_prompts=16", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "6",
         "--set", "validation.enabled=false", "--set", "grpo.reward=tests.rewards:even_length", "--max-steps", "2",
         "--set", "train.save_every=1", "--quiet"]


def _stopped(pid: int) -> bool:
    from pathlib import Path

    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _wait_for(pred, timeout: float = 120.0, what: str = "") -> None:
    t0 = time.time()
    while not pred():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_never_replaces_a_finished_out_whenever_it_was_started(tiny_ckpt, tmp_path):
    """#24.1: the second run passed the output check, then waited (here: stopped itself right before taking the
    lock) while the first finished; it must then refuse, not replace the first run's output. A third run started
    while the first works is refused at once by the lock."""
    out = tmp_path / "x"
    args = ["rl", str(tiny_ckpt), *SMALL, "--out", str(out)]
    second = start_cli(*args, env={"TSOPSD_FAULT": "STOP@lock"})
    try:
        _wait_for(lambda: _stopped(second.pid), what="the second run to reach the lock")
        first = start_cli(*args)
        _wait_for(lambda: (tmp_path / ".x.partial").exists() or first.poll() is not None, what="the first run")
        third = run_cli(*args)
        assert third.returncode == 2 and "x" in third.stderr, third.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read()
        before = (out / "model.safetensors").read_bytes(), (out / "metrics.jsonl").stat().st_mtime_ns
    finally:
        second.send_signal(signal.SIGCONT)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2 and "already exists" in err and "--overwrite" in err, err
    assert ((out / "model.safetensors").read_bytes(), (out / "metrics.jsonl").stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no partial, no lock left by either refusal


# --------------------------------------------------------------------------- several processes (#24, by hand)
# Ranks started as srun starts them: one process per rank, each with its own environment (RANK, WORLD_SIZE,
# MASTER_ADDR/PORT on loopback, gloo), no launcher watching them. Kept small: tiny checkpoints, 1-3 steps.
MP = [*SMALL, "--set", "train.strategy=fsdp", "--max-steps", "3", "--prompts-per-step", "4", "--num-generations",
      "4"]


def start_ranks(n: int, args_per_rank: list[list[str]], env: dict | None = None,
                env_per_rank: list[dict] | None = None, ranks: list[int] | None = None) -> dict:
    """Start the given ranks (default: all n) of one n-process job; returns {rank: Popen}."""
    from tests.conftest import free_port

    port = free_port()
    procs = {}
    for rank in (range(n) if ranks is None else ranks):
        extra = {"OMP_NUM_THREADS": "1", **(env or {}), **((env_per_rank or [{}] * n)[rank]),
                 "WORLD_SIZE": str(n), "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}
        procs[rank] = start_cli(*args_per_rank[rank], env=extra)
        procs[rank].port = port
    return procs


def finish_all(procs: dict, timeout: float = 600) -> dict:
    """{rank: (exit code, stderr, seconds from the start of waiting to its exit)}."""
    t0, done = time.time(), {}
    while len(done) < len(procs):
        for rank, p in procs.items():
            if rank not in done and p.poll() is not None:
                done[rank] = (p.returncode, p.stderr.read(), time.time() - t0)
        if time.time() - t0 > timeout:
            for p in procs.values():
                p.kill()
            raise AssertionError(f"ranks still running after {timeout} s: {set(procs) - set(done)}")
        time.sleep(0.05)
    return done


def errors_of(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("tsopsd: error:")]


def left_behind(tmp_path, name: str = "x") -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.slow
def test_two_ranks_a_nan_on_rank_1_at_step_2_both_exit_3_and_the_step_1_checkpoint_resumes(tiny_ckpt, tmp_path):
    out = tmp_path / "x"
    args = ["rl", str(tiny_ckpt), *MP, "--out", str(out)]
    done = finish_all(start_ranks(2, [args, args], env={"TSOPSD_FAULT": "NAN@step#2", "TSOPSD_FAULT_RANK": "1"}))
    assert [done[r][0] for r in (0, 1)] == [3, 3], done
    assert abs(done[0][2] - done[1][2]) < 10  # together, not after a collective timeout
    line = errors_of(done[0][1])
    assert len(line) == 1 and "non-finite loss" in line[0] and "step 2" in line[0], done[0][1]
    ckpts = tmp_path / ".x.partial" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001"]
    assert left_behind(tmp_path) == [".x.partial"]  # the lock is released
    done = finish_all(start_ranks(2, [args + ["--resume"]] * 2))
    assert [done[r][0] for r in (0, 1)] == [0, 0], done
    assert steps_of(out) == [1, 2, 3]


@pytest.mark.slow
def test_two_ranks_that_disagree_on_a_recipe_value_both_exit_2_at_start_up_leaving_nothing(tiny_ckpt, tmp_path):
    out = tmp_path / "x"
    args = ["rl", str(tiny_ckpt), *MP, "--out", str(out)]
    done = finish_all(start_ranks(2, [args, args + ["--lr", "5e-3"]]), timeout=300)
    assert [done[r][0] for r in (0, 1)] == [2, 2], done
    line = errors_of(done[0][1])
    assert len(line) == 1 and "disagree on the recipe" in line[0] and "[1]" in line[0], done[0][1]
    assert not out.exists() and left_behind(tmp_path) == []


@pytest.mark.slow
def test_sigterm_to_a_rank_whose_peer_never_started_exits_130_within_seconds(tiny_ckpt, tmp_path):
    import socket

    out = tmp_path / "x"
    procs = start_ranks(2, [["rl", str(tiny_ckpt), *MP, "--out", str(out)]] * 2, ranks=[0])
    p = procs[0]

    def listening():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", p.port)) == 0

    _wait_for(lambda: listening() or p.poll() is not None, what="rank 0 to wait for its peer")
    time.sleep(1.0)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    code = p.wait(timeout=60)
    took = time.time() - t0
    err = p.stderr.read()
    assert code == 130 and took < 10, (code, took, err)
    assert len(errors_of(err)) == 1 and "SIGTERM" in errors_of(err)[0], err
    assert left_behind(tmp_path) == []


@pytest.mark.slow
def test_a_rank_killed_during_setup_its_peer_exits_within_seconds_leaving_no_partial_or_lock(tiny_ckpt, tmp_path):
    out = tmp_path / "x"
    args = ["rl", str(tiny_ckpt), *MP, "--out", str(out)]
    done = finish_all(start_ranks(2, [args, args], env={"TSOPSD_FAULT": "KILL@setup-run", "TSOPSD_FAULT_RANK": "1",
                                                         "TSOPSD_PEER_TIMEOUT": "10"}), timeout=300)
    assert done[1][0] == -signal.SIGKILL
    assert done[0][0] == 6 and done[0][2] - done[1][2] < 30, done[0]  # the peer timeout + GRACE, not 30 min
    assert len(errors_of(done[0][1])) == 1 and "rank 1" in errors_of(done[0][1])[0], done[0][1]
    assert not out.exists() and left_behind(tmp_path) == []


@pytest.mark.slow
def test_a_rank_that_fails_during_setup_makes_every_rank_exit_with_its_code(tiny_ckpt, tmp_path):
    """Rank 1 reads another (here: corrupt) checkpoint: refused on every rank (exit 2) within seconds."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "x"
    done = finish_all(start_ranks(2, [["rl", str(tiny_ckpt), *MP, "--out", str(out)],
                                      ["rl", str(bad), *MP, "--out", str(out)]]), timeout=300)
    assert [done[r][0] for r in (0, 1)] == [2, 2], done
    assert "rank 1" in errors_of(done[0][1])[0]
    assert not out.exists() and left_behind(tmp_path) == []


# ------------------------------------------------------------------------- input validation, CLI (#24.7, #24.8)
def test_rl_data_with_empty_answers_is_refused_with_a_count(tiny_ckpt, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1=?", "answer": "2"}\n{"problem": "2+2=?", "answer": null}\n'
                    '{"problem": "3+3=?", "answer": []}\n')
    line = one_error_line(run_main("rl", str(tiny_ckpt), "--data", str(data), "--out", str(tmp_path / "x")))
    assert "2 of 3 rows" in line and "empty 'answer'" in line and "line 2" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_rl_prompts_longer_than_the_models_context_are_refused(tiny_ckpt, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+" * 200 + "1=?", "answer": "201"}) + "\n")  # context: 128 tokens
    line = one_error_line(run_main("rl", str(tiny_ckpt), "--data", str(data), "--out", str(tmp_path / "x")))
    assert "model's context (128 tokens" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def _nan_checkpoint(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    ck = tmp_path / "nan-ckpt"
    shutil.copytree(tiny_ckpt, ck)
    w = load_file(ck / "model.safetensors")
    name = sorted(w)[3]
    w[name] = w[name].clone()
    w[name].view(-1)[0] = float("nan")
    save_file(w, ck / "model.safetensors", metadata={"format": "pt"})
    return ck


def test_a_checkpoint_with_nan_weights_is_bad_input_everywhere(tiny_ckpt, tmp_path):
    ck = _nan_checkpoint(tiny_ckpt, tmp_path)
    for args in (["rl", str(ck), *SMALL, "--out", str(tmp_path / "x")],
                 ["eval", str(ck), "--limit", "1", "-n", "1", "--max-new-tokens", "4", "--quiet"],
                 ["diagnose", str(ck), "--num-prompts", "1", "--num-generations", "1", "--max-new-tokens", "4",
                  "--quiet"]):
        line = one_error_line(run_main(*args), code=2)
        assert "NaN or infinite" in line, (args[0], line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan-ckpt"]


def test_bad_environment_values_do_not_break_version(tmp_path):
    for env in ({"TSOPSD_LOG_EVERY": "abc"}, {"WORLD_SIZE": "x"}):
        p = run_cli("--version", env=env)
        assert p.returncode == 0 and p.stdout.startswith("tsopsd "), (env, p.stderr)
    line = one_error_line(run_main("toy", "init", "--out", str(tmp_path / "t"), "--steps", "1",
                                   env={"TSOPSD_LOG_EVERY": "abc"}))
    assert "TSOPSD_LOG_EVERY" in line


@pytest.mark.slow
def test_a_closed_stdout_does_not_fail_a_finished_run(tiny_ckpt, tmp_path):
    out = tmp_path / "x"
    p = start_cli("rl", str(tiny_ckpt), *SMALL, "--max-steps", "1", "--out", str(out), "--json")
    p.stdout.close()  # as `| head -c 0` does
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert (out / "model.safetensors").is_file() and "error" not in err


@pytest.mark.slow
def test_ctrl_c_is_exit_130_with_one_line(tiny_ckpt, tmp_path):
    p = run_cli("rl", str(tiny_ckpt), *SMALL, "--out", str(tmp_path / "x"), env={"TSOPSD_FAULT": "INT@rollout#1"})
    line = one_error_line(p, code=130)
    assert "SIGINT" in line
    # a KeyboardInterrupt raised inside a command (a second Ctrl-C) reaches tsopsd, not typer's silent exit 130
    from tsopsd_cli.cli import app

    def boom(*a, **k):
        raise KeyboardInterrupt

    import tsopsd_cli.runners.rl as rl_runner

    orig, rl_runner.run_rl = rl_runner.run_rl, boom
    try:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = app.main(["rl", str(tiny_ckpt), "--out", str(tmp_path / "y")])
    finally:
        rl_runner.run_rl = orig
    assert code == 130 and err.getvalue().startswith("tsopsd: error: interrupted"), err.getvalue()


def test_eval_grade_stops_on_a_signal(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text("".join(json.dumps({"completion": "so \\boxed{4}", "answer": "4"}) + "\n" for _ in range(40)))
    p = run_cli("eval", "grade", str(f), "--json", "--quiet", env={"TSOPSD_FAULT": "TERM@grade-chunk#2"})
    line = one_error_line(p, code=130)
    assert "SIGTERM received during grading" in line and p.stdout == ""


# ---------------------------------------------------------------------- damaged checkpoints, full disk (#24.6)
@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(tiny_ckpt, tmp_path):
    args = ["rl", str(tiny_ckpt), *SMALL, "--max-steps", "3"]
    for damage in ("truncated trainer state", "missing shard"):
        out = tmp_path / damage.replace(" ", "-")
        p = run_cli(*args, "--out", str(out), env={"TSOPSD_FAULT": "KILL@step#3"})
        assert p.returncode == -signal.SIGKILL
        ckpts = tmp_path / f".{out.name}.partial" / "checkpoints"
        assert sorted(x.name for x in ckpts.iterdir()) == ["step-000001", "step-000002"]
        if damage == "truncated trainer state":
            st = ckpts / "step-000002" / "trainer_state.pt"
            st.write_bytes(st.read_bytes()[:100])
        else:
            for shard in (ckpts / "step-000002" / "state").glob("*.distcp"):
                shard.unlink()
        p = run_main(*args, "--out", str(out), "--resume")
        assert p.returncode == 0, p.stderr
        warnings = [x for x in p.stderr.splitlines() if x.startswith("tsopsd: warning:")]
        assert len(warnings) == 1 and "step-000002" in warnings[0] and "falling back" in warnings[0], p.stderr
        assert "Traceback" not in p.stderr
        assert steps_of(out) == [1, 2, 3]


def test_a_full_disk_during_a_checkpoint_write_is_one_line_exit_8_and_resumable(tiny_ckpt, tmp_path, monkeypatch):
    """A full disk during a step checkpoint: torch.distributed.checkpoint raises CheckpointException (a
    BaseException, which escaped every handler once) holding the rank's OSError and its traceback; the line quoted
    a fragment of that traceback and never said that the disk was full."""
    import contextlib
    import io
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from tsopsd_cli.parallel import dcp
    from tsopsd_cli.cli import app

    calls = []
    real = dcp.save_state

    def save_state(path, model, opt):
        calls.append(path)
        if len(calls) == 2:
            try:
                raise OSError(28, "No space left on device")
            except OSError as e:  # as torch wraps a rank's failure: the exception and its formatted traceback
                raise CheckpointException("CheckpointException ranks:dict_keys([0])",
                                          {0: (e, traceback.extract_tb(e.__traceback__))}) from None
        return real(path, model, opt)

    monkeypatch.setattr(dcp, "save_state", save_state)
    out = tmp_path / "x"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = app.main(["rl", str(tiny_ckpt), *SMALL, "--max-steps", "3", "--out", str(out)])
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert code == 8 and len(lines) == 1, err.getvalue()
    assert "checkpoint of step 2" in lines[0] and "step 1 is kept" in lines[0] and "--resume" in lines[0]
    assert "no space left on the device" in lines[0] and "Traceback" not in lines[0] and "File " not in lines[0]
    ckpts = tmp_path / ".x.partial" / "checkpoints"
    assert sorted(x.name for x in ckpts.iterdir()) == ["step-000001"]  # no half-written staging folder
    monkeypatch.setattr(dcp, "save_state", real)
    p = run_main("rl", str(tiny_ckpt), *SMALL, "--max-steps", "3", "--out", str(out), "--resume")
    assert p.returncode == 0, p.stderr
    assert steps_of(out) == [1, 2, 3]


@pytest.mark.slow
def test_two_ranks_sigterm_during_the_rollout_stops_generation_and_agrees_at_once(tiny_ckpt, tmp_path):
    """#21.4: a signal during generation is acted on at the next decoding step, not after the whole step (with
    several processes the safe point used to be the start of the next step only)."""
    out = tmp_path / "x"
    args = ["rl", str(tiny_ckpt), *MP, "--out", str(out)]
    done = finish_all(start_ranks(2, [args, args], env={"TSOPSD_FAULT": "TERM@rollout#2"}))
    assert [done[r][0] for r in (0, 1)] == [130, 130], done
    line = errors_of(done[0][1])
    assert len(line) == 1 and "rollout of step 2" in line[0] and "checkpoint of step 1" in line[0], done[0][1]
    assert sorted(p.name for p in (tmp_path / ".x.partial" / "checkpoints").iterdir()) == ["step-000001"]
    done = finish_all(start_ranks(2, [args + ["--resume"]] * 2))
    assert [done[r][0] for r in (0, 1)] == [0, 0], done
    assert steps_of(out) == [1, 2, 3]


@pytest.mark.slow
def test_a_rank_with_a_bad_flag_stops_its_peers_waiting_in_the_rendezvous(tiny_ckpt, tmp_path):
    """A rank that fails before it joins (here: an unknown recipe field) posts its failure on the job's store: the
    other one, waiting for it in the rendezvous, exits with the same code instead of waiting 30 minutes."""
    out = tmp_path / "x"
    args = ["rl", str(tiny_ckpt), *MP, "--out", str(out)]
    for bad in (0, 1):
        per = [args, args]
        per[bad] = args + ["--set", "train.no_such_field=1"]
        done = finish_all(start_ranks(2, per), timeout=120)
        assert [done[r][0] for r in (0, 1)] == [2, 2], (bad, done)
        good = 1 - bad
        assert f"rank {bad} failed" in errors_of(done[good][1])[0], done[good][1]
        assert [x for x in done[bad][1].splitlines() if x.strip()] == errors_of(done[bad][1])  # one line, no noise
        assert not out.exists() and left_behind(tmp_path) == []


# ------------------------------------------------------------------------- the third fault round (#31)
def _finished(p: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def _freeze(folder):
    """Make `folder`'s entries impossible to add, remove or rename (as `chattr +i` does, or a read-only mode for a
    user other than root); returns the function that undoes it."""
    import os

    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    p = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {p.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.slow
def test_a_failed_final_rename_keeps_the_finished_run_and_resume_moves_it_into_place(tiny_ckpt, tmp_path):
    """The output folder's parent became unwritable right before the end: finish() had deleted state.json before
    the rename failed (exit 1 naming the lock), and the --resume that followed refused the finished run as one of
    "a different recipe or input" and offered --restart."""
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "x"
    args = ["rl", str(tiny_ckpt), *SMALL, "--out", str(out)]
    p = start_cli(*args, env={"TSOPSD_FAULT": "STOP@finish"})
    thaw = None
    try:
        _wait_for(lambda: _stopped(p.pid) or p.poll() is not None, what="the run to reach its finish")
        thaw = _freeze(parent)
    finally:
        p.send_signal(signal.SIGCONT)
        try:
            done = _finished(p)
        finally:
            if thaw is not None:
                thaw()
    line = one_error_line(done, code=8)
    assert str(out) in line and "--resume" in line and "complete" in line, line
    partial = parent / ".x.partial"
    assert json.loads((partial / "state.json").read_text())["complete"] is True
    assert (partial / "model.safetensors").is_file() and not out.exists()
    p = run_cli(*args, "--resume")
    assert p.returncode == 0, p.stderr
    assert (out / "model.safetensors").is_file() and steps_of(out) == [1, 2]
    assert not (out / "state.json").exists() and not (out / "checkpoints").exists()
    assert sorted(x.name for x in parent.iterdir()) == ["x"]  # no partial, no lock


@pytest.mark.slow
def test_the_inputs_files_copied_into_the_output_are_those_read_at_start_up(tiny_ckpt, tmp_path):
    """The input checkpoint removed between steps of `rl`: exit 0 with a made-up generation config (and the
    output dtype of a config that was no longer there) where the docs promise a byte copy of the input's."""
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    gen = json.loads((ck / "generation_config.json").read_text())
    gen_bytes = (json.dumps({**gen, "tsopsd_test": "kept"}, indent=1) + "\n").encode()
    (ck / "generation_config.json").write_bytes(gen_bytes)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    out = tmp_path / "x"
    p = start_cli("rl", str(ck), *SMALL, "--out", str(out), env={"TSOPSD_FAULT": "STOP@finish"})
    try:
        _wait_for(lambda: _stopped(p.pid) or p.poll() is not None, what="the run to reach its finish")
        ck.rename(tmp_path / "ck-moved")
    finally:
        p.send_signal(signal.SIGCONT)
    done = _finished(p)
    assert done.returncode == 0, done.stderr
    assert (out / "generation_config.json").read_bytes() == gen_bytes
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def _limited_file_size(limit: int):
    """preexec_fn: files this process writes may not grow past `limit` bytes (writes beyond fail with EFBIG, a
    refusal of the filesystem as a full disk's ENOSPC is: the same path through the code, no root needed)."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _run_limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_command(), *args], capture_output=True, text=True, env=cli_env(), timeout=600,
                          preexec_fn=_limited_file_size(limit))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["final weights", "step checkpoint"])
def test_a_refused_write_is_exit_8_with_one_line_and_the_run_resumes(where, tiny_ckpt, tmp_path):
    """The disk filling during the final weight write was exit 1 "internal error" quoting SafetensorError; during
    a step checkpoint the line quoted a traceback fragment. A file that cannot grow (model.safetensors is
    ~100 KB, a step checkpoint ~300 KB) is refused by the filesystem the same way."""
    out = tmp_path / "x"
    args = ["rl", str(tiny_ckpt), *SMALL, "--out", str(out)]
    if where == "final weights":
        args += ["--set", "train.save_every=0"]
    p = _run_limited(args, limit=60_000 if where == "final weights" else 200_000)
    line = one_error_line(p, code=8)
    assert "file too large" in line and "--resume" in line and ".x.partial" in line, line
    assert ("final" in line) if where == "final weights" else ("checkpoint of step 1" in line)
    assert not out.exists() and (tmp_path / ".x.partial").is_dir()
    p = run_cli(*args, "--resume")
    assert p.returncode == 0, p.stderr
    assert steps_of(out) == [1, 2]


REWARD_FUNCTIONS = """
def raises(completions, answers):
    return [1.0 / 0 for c in completions]


def one_too_many(completions, answers):
    return [1.0] * (len(completions) + 1)


def words(completions, answers):
    return ["good" for c in completions]
"""


@pytest.mark.parametrize("spec,fragment", [("rw:raises", "raised ZeroDivisionError"),
                                           ("rw:one_too_many", "returned 5 values for 4 completions"),
                                           ("rw:words", "('good') is not a number"),
                                           ("rw_import:reward", "importing")])
@pytest.mark.slow
def test_a_reward_function_that_fails_its_contract_is_exit_7_naming_grpo_reward(spec, fragment, tiny_ckpt,
                                                                                 tmp_path):
    """One value too many trained with every reward shifted by one (exit 0); a raising one was exit 1 "internal
    error". The user's code failing is exit 7, with one line naming grpo.reward."""
    (tmp_path / "rw.py").write_text(REWARD_FUNCTIONS)
    (tmp_path / "rw_import.py").write_text("raise RuntimeError('no settings file')\n")
    p = run_cli("rl", str(tiny_ckpt), *SMALL, "--set", f"grpo.reward={spec}", "--out", str(tmp_path / "x"),
                env={"PYTHONPATH": str(tmp_path)})
    line = one_error_line(p, code=7)
    assert "grpo.reward" in line and spec in line and fragment in line, line


@pytest.mark.slow
@pytest.mark.parametrize("question", [None, 12])
def test_a_null_or_non_text_question_is_bad_input_everywhere(question, tiny_ckpt, tmp_path):
    """A null question was trained and diagnosed as the prompt "None\\n..." (eval refused it); a number was
    rendered as text by every command."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1=?", "answer": "2"}) + "\n" +
                    json.dumps({"problem": question, "answer": "2"}) + "\n")
    for args in (["rl", str(tiny_ckpt), "--data", str(data), "--out", str(tmp_path / "x")],
                 ["diagnose", str(tiny_ckpt), "--data", str(data), "--num-generations", "1", "--max-new-tokens",
                  "4"],
                 ["eval", str(tiny_ckpt), "--data", str(data), "-n", "1", "--max-new-tokens", "4",
                  "--out", str(tmp_path / "e")]):
        line = one_error_line(run_cli(*args))
        assert "d.jsonl" in line and "question" in line and "text" in line, (args[0], line)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.jsonl"]


def test_prompts_the_models_context_cannot_take_are_refused_by_every_command(tiny_ckpt, tmp_path):
    """eval and diagnose sampled a 400-token prompt on a checkpoint with a 128-token context (exit 0, no warning)
    where rl refused the same file."""
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"problem": "1+" * 200 + "1=?", "answer": "201"}) + "\n")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"problem": "1+1=?", "answer": "2"}) + "\n")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "math500.jsonl").write_text(long.read_text())
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"prompt": "1+1=?", "completion": "2" * 300}) + "\n")
    for args in (["eval", str(tiny_ckpt), "--data", str(long), "-n", "1", "--max-new-tokens", "4",
                  "--out", str(tmp_path / "e")],
                 ["diagnose", str(tiny_ckpt), "--data", str(long), "--num-generations", "1"],
                 ["diagnose", str(tiny_ckpt), "--texts", str(texts)],
                 ["reheat", str(tiny_ckpt), "--data", str(long), "--out", str(tmp_path / "r")],
                 ["rl", str(tiny_ckpt), "--data", str(short), "--set", "validation.benchmarks=[math500]",
                  "--set", f"validation.data_dir={bench}", "--out", str(tmp_path / "x")]):
        line = one_error_line(run_main(*args))  # (bad input: in this process)
        assert "model's context (128 tokens" in line, (args, line)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bench", "long.jsonl", "short.jsonl", "texts.jsonl"]


def test_an_eval_refused_at_start_up_leaves_nothing_and_the_corrected_command_runs(tiny_ckpt, tmp_path):
    """The refusal left `.OUT.partial` holding only state.json; the corrected command was then refused as "a
    different recipe"."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1=?", "answer": "2"}) + "\n")
    args = ["eval", str(tiny_ckpt), "--data", str(data), "-n", "1", "--max-new-tokens", "4", "--out",
            str(tmp_path / "e")]
    line = one_error_line(run_main(*args, "--chat-template"))
    assert "chat template" in line
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.jsonl"]
    p = run_main(*args)
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_a_damaged_row_in_an_unfinished_evals_samples_is_dropped_and_redone(tiny_ckpt, tmp_path):
    """A samples file with a row that lacks its fields (a hand edit, a foreign tool) ended the resumed eval with
    exit 1 (KeyError)."""
    args = ["eval", str(tiny_ckpt), "--set", "eval.toy_num_problems=8", "--set", "eval.chunk_problems=4", "-n", "1",
            "--max-new-tokens", "4", "--set", "eval.grader_workers=1", "--out", str(tmp_path / "e"), "--quiet"]
    one_error_line(run_cli(*args, env={"TSOPSD_FAULT": "TERM@eval-chunk#2"}), code=130)
    samples = tmp_path / ".e.partial" / "samples.jsonl"
    with open(samples, "a") as fh:
        fh.write('{"benchmark": "toy"}\n')
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    assert len((tmp_path / "e" / "samples.jsonl").read_text().splitlines()) == 8
