"""The rl runner on a tiny model: exact first ratio, gradient-accumulation invariance."""

from __future__ import annotations

import pytest
import torch

from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
from tsopsd_cli.runners.rl import RLRunner
from tsopsd_cli.tasks.grading import Grader

BASE = ["data.num_prompts=64", "train.prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=12",
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
        run = runner(tiny_ckpt, tmp_path, name, f"train.micro_batch_size={mbs}", "train.prompts_per_step=2",
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
        run = runner(tiny_ckpt, tmp_path, name, "train.micro_batch_size=3", "train.prompts_per_step=4",
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


# Every option that is not a default, tested like a default: the update must not depend on micro_batch_size (the
# loss is normalised by whole-batch counts and token selections are made over the whole mini-batch), and the first
# mini-batch's importance ratio is exactly 1.
OPTIONS = {
    "seq-mean-token-mean": ["grpo.loss_aggregation=seq-mean-token-mean"],
    "dr-grpo": ["grpo.loss_aggregation=seq-mean-token-sum-norm", "grpo.scale_rewards=none"],
    "batch-std": ["grpo.scale_rewards=batch"],
    "clip-cov": ["grpo.clip_cov.enabled=true", "grpo.clip_cov.ratio=0.2", "grpo.clip_cov.lower=0.0",
                 "grpo.clip_cov.upper=100.0"],
    "kl-cov": ["grpo.kl_cov.enabled=true", "grpo.kl_cov.ratio=0.2", "grpo.mini_batches=2"],
    "kl-ref-k3": ["grpo.beta=0.1", "grpo.kl_estimator=k3"],
    "kl-ref-k2": ["grpo.beta=0.1", "grpo.kl_estimator=k2"],
    "entropy-bonus": ["grpo.entropy_coef=0.01"],
    "entropy-bonus-hot": ["grpo.entropy_coef=0.01", "rollout.temperature=1.3"],
    "overlong-masking": ["grpo.mask_truncated=true", "rollout.max_new_tokens=6"],
    "dynamic-sampling": ["grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=2"],
    "rollout-temperature": ["rollout.temperature=0.7"],
    "epochs-and-mini-batches": ["grpo.ppo_epochs=2", "grpo.mini_batches=2"],
    "high-entropy-tokens": ["grpo.top_entropy_quantile=0.2", "grpo.beta=0.1", "grpo.entropy_coef=0.01"],
    "high-entropy-tokens-hot": ["grpo.top_entropy_quantile=0.3", "rollout.temperature=1.3", "grpo.ppo_epochs=2",
                                "grpo.mini_batches=2"],
    "adaptive-entropy": ["grpo.entropy_target=100", "grpo.entropy_coef=0.01", "grpo.entropy_coef_step=0.01"],
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_gives_the_same_update_at_any_micro_batch_size(name, tiny_ckpt, tiny_sharp_ckpt, tmp_path):
    params, metrics = [], []
    batch = None
    ckpt = tiny_sharp_ckpt if "high-entropy" in name else tiny_ckpt  # (see the fixture)
    for mbs in (4, 32):
        run = runner(ckpt, tmp_path, f"{name}-{mbs}", f"train.micro_batch_size={mbs}",
                     "optim.max_grad_norm=null", ADAM_LINEAR, *OPTIONS[name])
        try:
            with Grader(workers=1) as g:
                run.grader = g
                fresh = run.rollout()  # (keeps both runs' seed sequences in step)
                batch = batch or fresh
                metrics.append(run.train_on(batch))
            params.append(torch.cat([p.detach().flatten() for p in run.model.parameters()]))
        finally:
            run.run.close()
    torch.testing.assert_close(params[0], params[1], atol=2e-6, rtol=1e-4)
    a, b = metrics
    assert a["first_minibatch_max_ratio_dev"] == 0.0 and b["first_minibatch_max_ratio_dev"] == 0.0
    for key in ("loss", "grad_norm", "kl_ref", "cov_selected_tokens", "entropy", "loss_token_fraction"):
        if a.get(key) is not None:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    if "cov" in name:
        assert a["cov_selected_tokens"] > 0  # the selection really selected tokens
    if "high-entropy" in name:
        assert 0 < a["loss_token_fraction"] < 1
    if name.startswith("kl-ref"):
        assert a["kl_ref"] is not None and a["kl_ref"] >= 0
    assert torch.isfinite(params[0]).all()


def test_kl_cov_is_refused_when_every_update_is_on_policy():
    from tsopsd_cli.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        build_recipe("rl", None, parse_set_options(["grpo.kl_cov.enabled=true"]))
    assert "on-policy" in " ".join(e.value.lines)


def test_the_entropy_bonus_is_the_entropy_of_the_sampling_distribution(tiny_ckpt, tmp_path):
    """With rollout temperature T, the bonus differentiates the entropy of softmax(logits / T): compared with an
    explicit float64 computation of that gradient on the same micro-batch."""
    run = runner(tiny_ckpt, tmp_path, "ent", "rollout.temperature=1.5", "grpo.entropy_coef=1.0",
                 "train.micro_batch_size=64")
    try:
        with Grader(workers=1) as g:
            run.grader = g
            batch = run.rollout()
        batch.advantages = [0.0] * len(batch.seqs)  # only the bonus remains
        seqs = batch.seqs
        n_tok = float(sum(len(c) for _, c in seqs))
        run.model.zero_grad()
        run._micro_step(batch, list(range(len(seqs))), None,
                        None, {"tokens": n_tok, "seqs": len(seqs), "rows": len(seqs)}, {})
        got = run.model.lm_head.weight.grad.clone()
        run.model.zero_grad()
        hidden, weight, pb = run.hidden(run.model, seqs)
        logits = (hidden.double() @ weight.double().T) / 1.5
        lp = logits.log_softmax(-1)
        ent = -(lp.exp() * lp).sum(-1)
        (-ent.sum() / n_tok).backward()
        torch.testing.assert_close(got, run.model.lm_head.weight.grad, atol=1e-6, rtol=1e-4)
    finally:
        run.run.close()


# --------------------------------------------------------------------------------- grpo.top_entropy_quantile
def trained_flat(run) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in run.model.parameters()])


def test_high_entropy_tokens_give_the_same_update_for_1_2_and_4_micro_batches(tiny_sharp_ckpt, tmp_path):
    """One update per rollout batch (the path where the training forward would give the old log-probs): the
    old-log-prob pass runs anyway and the threshold is taken over the whole step, so 1, 2 or 4 micro-batches
    train the same tokens."""
    probe = runner(tiny_sharp_ckpt, tmp_path, "probe", "grpo.top_entropy_quantile=0.3")
    with Grader(workers=1) as g:
        probe.grader = g
        batch = probe.rollout()
    probe.run.close()
    n_trained = sum(1 for a, keep in zip(batch.advantages, batch.loss_mask) if keep and a != 0)
    assert n_trained >= 4
    params, metrics = [], []
    for k in (1, 2, 4):
        run = runner(tiny_sharp_ckpt, tmp_path, f"m{k}", "grpo.top_entropy_quantile=0.3",
                     f"train.micro_batch_size={-(-n_trained // k)}", "optim.max_grad_norm=null", ADAM_LINEAR)
        try:
            with Grader(workers=1) as g:
                run.grader = g
                run.rollout()  # (keeps the runs' seed sequences in step)
                assert len(run.plan(batch, 0, torch.Generator())[0][1]) == k
                metrics.append(run.train_on(batch))
            params.append(trained_flat(run))
        finally:
            run.run.close()
    for m, p in zip(metrics[1:], params[1:]):
        torch.testing.assert_close(p, params[0], atol=2e-6, rtol=1e-4)
        for key in ("loss", "grad_norm", "loss_token_fraction"):
            assert m[key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-7), key
    assert all(m["first_minibatch_max_ratio_dev"] == 0.0 for m in metrics)
    assert 0.3 <= metrics[0]["loss_token_fraction"] < 1


def test_the_policy_loss_keeps_the_tokens_whose_sampling_entropy_is_in_the_top_rho(tiny_sharp_ckpt, tmp_path):
    """The mask against entropies at the rollout temperature computed by hand in float64 (the brute-force rule of
    tests/unit/test_grpo.py), and the first update's loss against its value written out: at ratio 1 each kept
    token adds -A, divided by every loss token of the step."""
    from tests.unit.test_grpo import brute_force_keep

    rho, temp = 0.25, 1.3
    run = runner(tiny_sharp_ckpt, tmp_path, "hand", f"grpo.top_entropy_quantile={rho}",
                 f"rollout.temperature={temp}",
                 "train.micro_batch_size=64")
    try:
        with Grader(workers=1) as g:
            run.grader = g
            batch = run.rollout()
        old = run.old_logprobs_pass(batch, run.plan(batch, 0, torch.Generator()))
        high = run.high_entropy_selection(batch, old)
        rows = [i for i in range(len(batch.seqs)) if batch.loss_mask[i]]
        with torch.no_grad():
            hidden, weight, _ = run.hidden(run.model, [batch.seqs[i] for i in rows])
            lp = ((hidden.double() @ weight.double().T) / temp).log_softmax(-1)
            ent = -(lp.exp() * lp).sum(-1)
        want = torch.tensor(brute_force_keep(ent.tolist(), rho))
        got = torch.cat([high.keep[i] for i in rows])
        threshold = ent[want].min()
        clear = (ent - threshold).abs() > 1e-4  # tokens not within rounding of the threshold
        assert clear.sum() > 0.9 * len(ent) and torch.equal(got[clear], want[clear])
        assert high.fraction == pytest.approx(float(got.sum()) / len(got)) and 0 < high.fraction < 1
        n_tok = sum(len(batch.seqs[i][1]) for i in rows)
        loss = -sum(batch.advantages[i] * float(high.keep[i].sum()) for i in rows) / n_tok
        m = run.train_on(batch)
        assert m["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
        assert m["loss_token_fraction"] == pytest.approx(high.fraction)
    finally:
        run.run.close()


def test_the_kl_and_the_entropy_bonus_keep_every_token(tiny_ckpt, tiny_ckpt_other, tmp_path):
    """With every advantage 0 only the KL to the reference and the entropy bonus remain: rho changes nothing."""
    params, batch = [], None
    for rho in (0.2, 1.0):
        run = runner(tiny_ckpt, tmp_path, f"kl{rho}", f"grpo.top_entropy_quantile={rho}", "grpo.beta=0.5",
                     "grpo.entropy_coef=0.05", "optim.max_grad_norm=null", ADAM_LINEAR)
        try:
            run.ref = run.frozen(str(tiny_ckpt_other))  # a reference that differs from the policy: KL > 0
            with Grader(workers=1) as g:
                run.grader = g
                fresh = run.rollout()
                batch = batch or fresh
            batch.advantages = [0.0] * len(batch.seqs)
            m = run.train_on(batch)
            assert m["kl_ref"] > 0
            params.append(trained_flat(run))
        finally:
            run.run.close()
    torch.testing.assert_close(params[0], params[1], atol=2e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------- grpo.entropy_target
def test_the_entropy_bonus_applies_the_adapted_coefficient(tiny_ckpt, tmp_path):
    """The loss uses the run's current coefficient (where adaptive control moved it), not the recipe's start."""
    params, batch = [], None
    for name, extra, coef in (("adapted", ["grpo.entropy_target=1.0", "grpo.entropy_coef=0.0"], 0.5),
                              ("fixed", ["grpo.entropy_coef=0.5"], None)):
        run = runner(tiny_ckpt, tmp_path, name, *extra, "optim.max_grad_norm=null", ADAM_LINEAR)
        try:
            if coef is not None:
                run.entropy_coef = coef
            with Grader(workers=1) as g:
                run.grader = g
                fresh = run.rollout()
                batch = batch or fresh
            run.train_on(batch)
            params.append(trained_flat(run))
        finally:
            run.run.close()
    torch.testing.assert_close(params[0], params[1], atol=2e-6, rtol=1e-4)
