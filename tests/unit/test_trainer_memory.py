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


def test_a_rollout_decodes_from_one_model_dtype_copy_freed_after_it(tiny_ckpt, tmp_path, monkeypatch):
    """model.dtype bfloat16 over float32 master weights (one process): the rollout decodes from one bfloat16 copy
    of the weights, made once for the rollout and freed when it returns, with no autocast inside the decode loop.
    Its tokens and log-probs equal sampling from a model whose parameters were cast to bfloat16 by hand (the
    rotary tables stay float32 in both). Autocast would give other roundings: it keeps the residual stream and the
    norms' outputs in float32 while matmuls run in bfloat16."""
    import copy
    import gc
    import weakref

    import torch

    from tsopsd_cli import lean
    from tsopsd_cli.engines.hf import HFEngine

    run = runner(tiny_ckpt, tmp_path, "c", "model.dtype=bfloat16")
    assert (run.pl.master_dtype, run.pl.compute_dtype) == (torch.float32, torch.bfloat16)
    copies, autocast, calls = [], [], []
    real_init, real_forward, real_generate = lean.DecodeWeights.__init__, lean.LeanDecoder._forward, run.engine.generate

    def init(self, model, dtype=None):
        real_init(self, model, dtype)
        copies.append((self.copied_bytes, [weakref.ref(t) for t in (self.embed, *self.layers[0]) if t is not None]))

    def forward(self, *args):
        autocast.append(torch.is_autocast_enabled("cpu"))
        return real_forward(self, *args)

    monkeypatch.setattr(lean.DecodeWeights, "__init__", init)
    monkeypatch.setattr(lean.LeanDecoder, "_forward", forward)
    def generate(prompts, params, **kw):
        calls.append((prompts, params, real_generate(prompts, params, **kw)))
        return calls[-1][2]

    monkeypatch.setattr(run.engine, "generate", generate)
    with Grader(workers=1) as g:
        run.grader = g
        run.rollout()
    gc.collect()
    (prompts, params, got), = calls
    (copied, refs), = copies  # one copy for the rollout
    params_bytes = sum(p.numel() * 2 for p in run.model.parameters())  # every parameter once (tied ones too)
    assert copied == params_bytes
    assert all(ref() is None for ref in refs)  # freed with the rollout
    assert autocast and not any(autocast)
    by_hand = copy.deepcopy(run.model)
    for p in by_hand.parameters():
        p.data = p.data.to(torch.bfloat16)
    want = HFEngine(by_hand, run.tok, batch_size=run.engine.batch_size).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.logprobs for c in got] == [c.logprobs for c in want]
