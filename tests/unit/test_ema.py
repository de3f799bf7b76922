"""The EMA teacher (reheat.teacher ema, thermostat.teacher ema): its weights against averages taken by hand."""

from __future__ import annotations

import pytest
import torch

from tsopsd_cli.parallel import sharding
from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
from tsopsd_cli.runners.reheat import ReheatRunner
from tsopsd_cli.runners.rl import RLRunner

DECAY = 0.7  # far from 1, so that a few steps move the teacher visibly
SMALL = ["data.num_prompts=64", "train.prompts_per_step=4", "rollout.num_generations=2", "rollout.max_new_tokens=10",
         "validation.enabled=false", "optim.lr=1e-2", "train.micro_batch_size=4", "train.max_steps=3"]


def weights64(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def assert_average(teacher, student_steps: list[dict], start: dict, decay: float) -> None:
    """`teacher`'s weights equal start, then t := decay x t + (1 - decay) x s for each student state s, in float64."""
    want = dict(start)
    for s in student_steps:
        want = {n: decay * want[n] + (1 - decay) * s[n] for n in want}
    for n, p in teacher.named_parameters():
        assert p.dtype == torch.float32 and not p.requires_grad, n
        torch.testing.assert_close(p.detach().double(), want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_ema_update_against_a_hand_average():
    torch.manual_seed(0)
    avg, model = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    a0, m0 = weights64(avg), weights64(model)
    sharding.ema_update(avg, model, 0.9)
    for n, p in avg.named_parameters():
        torch.testing.assert_close(p.detach().double(), 0.9 * a0[n] + 0.1 * m0[n], atol=1e-7, rtol=0)
    with pytest.raises(RuntimeError, match="not placed alike"):
        sharding.ema_update(torch.nn.Linear(5, 2), model, 0.9)


def test_reheats_ema_teacher_is_the_running_average_of_the_student_after_each_step(tiny_ckpt, tmp_path):
    r = build_recipe("reheat", None, parse_set_options([*SMALL, "reheat.teacher=ema",
                                                        f"reheat.teacher_ema_decay={DECAY}", "reheat.report_prompts=2",
                                                        f"output.out={tmp_path / 'r'}"]))
    run = ReheatRunner(r, str(tiny_ckpt))
    run.setup()
    try:
        start = weights64(run.model)  # the input checkpoint, as the student starts
        assert_average(run.ema, [], start, DECAY)
        students, teacher_entropy = [], []
        for _ in range(3):
            row = run.train_step()
            students.append(weights64(run.model))
            teacher_entropy.append(row["teacher_entropy"])
        assert_average(run.ema, students, start, DECAY)
        moved = sum(float((p.detach().double() - start[n]).abs().max()) for n, p in run.ema.named_parameters())
        assert moved > 1e-4  # the teacher really moved, and is not the student
        assert any(float((p.detach().double() - students[-1][n]).abs().max()) > 1e-5
                   for n, p in run.ema.named_parameters())
        assert run.extra_models() == {"ema_teacher": run.ema}
    finally:
        run.run.close()


def test_the_thermostats_ema_teacher_starts_as_the_snapshot_and_follows_the_student(tiny_ckpt, tmp_path):
    r = build_recipe("rl", None, parse_set_options([
        *SMALL, "grpo.reward=tests.rewards:even_length", "thermostat.enabled=true", "thermostat.threshold=100",
        "thermostat.window=1", "thermostat.min_gap=1", "thermostat.teacher=ema",
        f"thermostat.teacher_ema_decay={DECAY}", "thermostat.target_entropy_ratio=null",
        "thermostat.target_entropy=1000", f"output.out={tmp_path / 't'}"]))
    run = RLRunner(r, str(tiny_ckpt))
    run.setup()
    try:
        with torch.no_grad():  # a policy that differs from the input checkpoint, as it would after GRPO steps
            for p in run.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        assert run.thermostat.after_grpo_step(1, 1.0)  # (entropy below the threshold: a phase starts)
        run.take_snapshot()
        start = weights64(run.model)
        assert_average(run.ema, [], start, DECAY)
        students = []
        for _ in range(2):
            assert run.reheat_step()["phase"] == "reheat"
            students.append(weights64(run.model))
        assert_average(run.ema, students, start, DECAY)
        for n, p in run.snapshot.named_parameters():  # the snapshot (the metrics' reference) stays the start
            torch.testing.assert_close(p.detach().double(), start[n], atol=1e-6, rtol=1e-5)
        assert set(run.extra_models()) == {"snapshot", "ema_teacher"}
    finally:
        run.close()
        run.run.close()
