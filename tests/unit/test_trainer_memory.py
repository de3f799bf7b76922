"""What the trainer holds between steps: gradients are freed right after the optimiser step, so that they do not
stay allocated through the weight sync and the next rollout (where a waking vLLM engine needs the memory)."""

from __future__ import annotations

from tests.unit.test_rl_runner import runner
from tsopsd_cli.tasks.grading import Grader


def test_gradients_are_freed_right_after_the_optimiser_step(tiny_ckpt, tmp_path):
    run = runner(tiny_ckpt, tmp_path, "a", "train.micro_batch_size=4")
    with Grader(workers=1) as g:
        run.grader = g
        metrics = run.train_on(run.rollout())
    assert metrics["grad_norm"] > 0  # a real update happened
    assert all(p.grad is None for p in run.model.parameters())
    # the report still gives the gradient memory a step holds: one gradient per trainable parameter
    assert run.grad_bytes == sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    per_rank = run.report()["parallel"]["per_rank"][0]
    assert per_rank["gradient_bytes"] == run.grad_bytes > 0


def test_the_engine_releases_its_memory_before_training_and_before_the_final_gather(tiny_ckpt, tmp_path,
                                                                                    monkeypatch):
    import tsopsd_cli.training.trainer as trainer

    events = []
    real_write = trainer.write_checkpoint
    monkeypatch.setattr(trainer, "write_checkpoint", lambda *a, **k: (events.append("write"), real_write(*a, **k)))
    run = runner(tiny_ckpt, tmp_path, "b", "train.micro_batch_size=4")
    engine = run.engine
    for name in ("release", "acquire"):
        real = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda real=real, name=name: (events.append(name), real()))
    real_step = run.optimizer_step
    monkeypatch.setattr(run, "optimizer_step", lambda: (events.append("update"), real_step())[1])
    with Grader(workers=1) as g:
        run.grader = g
        run.run_loop()
    # every step: released after its rollouts, before its updates; and once more before the finished run's write
    assert events.index("release") < events.index("update")
    assert events[-2:] == ["release", "write"] and events.count("release") == run.r.train.max_steps + 1
