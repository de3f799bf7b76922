"""The rl runner on a tiny model: exact first ratio, gradient-accumulation invariance."""

from __future__ import annotations

import torch

from tsopsd_cli.recipe import build_recipe, parse_set_options
from tsopsd_cli.runners.rl import RLRunner
from tsopsd_cli.tasks.grading import Grader

BASE = ["data.num_prompts=64", "grpo.prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=12",
        "validation.enabled=false", "optim.lr=1e-3", "train.max_steps=2", "grpo.reward=tests.rewards:even_length"]
# Adam's early steps are ~ lr * sign(gradient): a gradient that is 0 up to rounding one way and 1e-12 the other
# would move a weight by lr. With eps = 1 the step is ~ lr * gradient, so rounding-level differences stay small.
ADAM_LINEAR = "optim.eps=1.0"


def runner(ckpt, tmp_path, name, *extra):
    r = build_recipe("rl", None, parse_set_options([*BASE, f"output.out={tmp_path / name}", *extra]))
    run = RLRunner(r, str(ckpt))
    run.setup()
    return run


def test_first_minibatch_ratio_is_exactly_one_and_metrics_are_sane(tiny_ckpt, tmp_path):
    run = runner(tiny_ckpt, tmp_path, "a", "grpo.mini_batches=2", "grpo.ppo_epochs=2", "train.micro_batch_size=4")
    with Grader(workers=1) as g:
        run.grader = g
        batch = run.rollout()
        m = run.train_on(batch)
    assert m["first_minibatch_max_ratio_dev"] == 0.0
    assert m["ratio_dev"] > 0  # later mini-batches see an updated policy
    assert 0 <= m["clip_frac_low"] <= 1 and 0 <= m["clip_frac_high"] <= 1
    assert m["entropy"] > 0 and m["grad_norm"] > 0
    assert batch.stats["groups_used"] == 4 and len(batch.seqs) == 16


def test_gradient_accumulation_1x8_equals_8x1(tiny_ckpt, tmp_path):
    params = []
    batch = None
    for name, mbs in (("one", 8), ("eight", 1)):
        run = runner(tiny_ckpt, tmp_path, name, f"train.micro_batch_size={mbs}", "grpo.prompts_per_step=2",
                     "optim.max_grad_norm=null", ADAM_LINEAR)
        with Grader(workers=1) as g:
            run.grader = g
            batch = batch or run.rollout()  # the same rollout batch for both
            assert len(batch.seqs) == 8
            run.train_on(batch)
        params.append(torch.cat([p.detach().flatten() for p in run.model.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=2e-6, rtol=1e-4)


def test_leaving_out_zero_advantage_rows_changes_nothing(tiny_ckpt, tmp_path, monkeypatch):
    params, trained = [], []
    batch = None
    for name, skip in (("skip", True), ("all", False)):
        run = runner(tiny_ckpt, tmp_path, name, "train.micro_batch_size=3", "grpo.prompts_per_step=4",
                     "grpo.mini_batches=2", "grpo.ppo_epochs=2", "optim.max_grad_norm=null", ADAM_LINEAR)
        monkeypatch.setattr(RLRunner, "skips_zero_advantage", lambda self, s=skip: s)
        with Grader(workers=1) as g:
            run.grader = g
            fresh = run.rollout()  # (keeps the runs' seed sequences in step)
            batch = batch or fresh
            if skip:  # make sure some rows really have advantage 0
                batch.advantages[:4] = [0.0] * 4
            m = run.train_on(batch)
        trained.append(m["trained_rows"])
        params.append(torch.cat([p.detach().flatten() for p in run.model.parameters()]))
    assert trained[0] < trained[1] == 1.0
    torch.testing.assert_close(params[0], params[1], atol=2e-6, rtol=1e-4)
