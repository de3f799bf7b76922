"""The TS-OPSD step (training.distill.distill_step) on a tiny random Qwen3, through a `StepPolicy` made of a model
and an optimiser alone: no TrainingRun, no recipe, no process group."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from tests.qwen_ckpt import model_config
from tsopsd_cli.core.divergences import DIVERGENCES
from tsopsd_cli.modeling import completion_hidden, decoder_and_head, pack
from tsopsd_cli.recipe import ReheatSection
from tsopsd_cli.training.distill import distill_step

VOCAB = 64
PAD = 0


class LonePolicy:
    """StepPolicy for one process: a model and an AdamW optimiser, nothing of a training run."""

    micro_batch_size = 2
    chunk_size = 16
    rollout_temperature = 1.0

    def __init__(self, model, extra_passes: int = 0):
        self.model = model
        self._opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        self._extra = extra_passes  # padding passes, as a process with fewer micro-batches than its peers runs
        self.losses: list[float] = []

    def hidden(self, model, seqs):
        pb = pack(seqs, PAD, "cpu")
        return completion_hidden(model, pb)[0], decoder_and_head(model)[1].weight, pb

    def passes(self, n_local: int) -> int:
        return n_local + self._extra

    def padding_seq(self):
        return [PAD], [PAD]

    def guard_loss(self, loss):
        self.losses.append(float(loss.detach()))
        return loss

    def global_sum(self, x):
        return x

    def global_mean(self, xs):
        return sum(xs) / len(xs) if xs else None

    def zero_grad(self) -> None:
        self._opt.zero_grad(set_to_none=True)

    def optimizer_step(self) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        self._opt.step()
        return norm

    def lr(self) -> float:
        return self._opt.param_groups[0]["lr"]


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = model_config("qwen3", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, intermediate_size=64, pad_token_id=PAD,
                       max_position_embeddings=64)
    cfg.attn_implementation = "eager"
    return Qwen3ForCausalLM(cfg).float()


def rollouts(seed: int = 1, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        prompt = torch.randint(1, VOCAB, (3 + i % 2,), generator=g).tolist()
        completion = torch.randint(1, VOCAB, (4 + i,), generator=g).tolist()
        seqs.append((prompt, completion))
    return seqs, [SimpleNamespace(token_ids=c) for _, c in seqs]


def own_logps(model, seqs) -> list[list[float]]:
    """The model's log-probs (temperature 1) of each completion token, one forward per sequence."""
    out = []
    with torch.no_grad():
        for p, c in seqs:
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].double()
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None])[:, 0].tolist())
    return out


def step(policy, teacher, seqs, comps, engine_lps=None, **section):
    return distill_step(policy, teacher, teacher, seqs, comps, engine_lps, ReheatSection(**section), 0.0, 0.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_step_through_the_narrow_policy_moves_the_student_and_reports_finite_metrics(divergence):
    student = tiny_qwen3()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    before = [p.detach().clone() for p in student.parameters()]
    frozen = [p.detach().clone() for p in teacher.parameters()]
    seqs, comps = rollouts()
    policy = LonePolicy(student)
    m = step(policy, teacher, seqs, comps, own_logps(student, seqs), temp=1.6, divergence=divergence)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))
    for key in ("loss", "student_entropy", "teacher_entropy", "top1_agreement", "kl_input", "grad_norm",
                "engine_logprob_diff", "response_length", "lr"):
        assert math.isfinite(m[key]), key
    assert m["loss"] > 0 and m["grad_norm"] > 0
    assert m["teacher_entropy"] > m["student_entropy"]  # the teacher is the student at temp 1.6
    assert m["top1_agreement"] == pytest.approx(1.0) and m["kl_input"] == pytest.approx(0.0, abs=1e-6)
    assert m["engine_logprob_diff"] == pytest.approx(0.0, abs=1e-4)  # the engine sampled with these weights
    assert m["tokens"] == sum(len(c) for _, c in seqs) and m["response_length"] == pytest.approx(6.0)
    assert len(policy.losses) == 3  # 5 sequences in micro-batches of 2


def test_padding_passes_change_nothing():
    seqs, comps = rollouts()
    results = []
    for extra in (0, 2):
        student = tiny_qwen3()
        m = step(LonePolicy(student, extra_passes=extra), copy.deepcopy(student).requires_grad_(False), seqs, comps)
        results.append((m, [p.detach().clone() for p in student.parameters()]))
    (m0, p0), (m2, p2) = results
    assert all(torch.equal(a, b) for a, b in zip(p0, p2))
    for key in ("loss", "student_entropy", "teacher_entropy", "grad_norm"):
        assert m2[key] == pytest.approx(m0[key], rel=1e-6), key


def test_a_live_teacher_at_temp_1_gives_zero_loss():
    student = tiny_qwen3()
    reference = copy.deepcopy(student).requires_grad_(False)
    seqs, comps = rollouts()
    m = distill_step(LonePolicy(student), None, reference, seqs, comps, None, ReheatSection(temp=1.0), 0.0, 0.0)
    assert m["loss"] == pytest.approx(0.0, abs=1e-6) and m["engine_logprob_diff"] is None


def test_metrics_against_a_reference_that_is_not_the_teacher_in_row_blocks(monkeypatch):
    """With a reference that is not the teacher (a live teacher, the thermostat's snapshot) the reference's logits
    are projected once per chunk of the loss and read a few rows at a time: kl_input and top1_agreement equal a
    float64 computation from full forwards, whether the loss takes its chunks whole or in blocks of 3 rows."""
    from tsopsd_cli.core import chunked

    seqs, comps = rollouts()
    student0, reference = tiny_qwen3(), tiny_qwen3(seed=7).requires_grad_(False)
    kls, agree = [], []
    with torch.no_grad():
        for p, c in seqs:
            ids = torch.tensor([p + c])
            ls = student0(input_ids=ids).logits[0, len(p) - 1:-1].double().log_softmax(-1)
            lr = reference(input_ids=ids).logits[0, len(p) - 1:-1].double().log_softmax(-1)
            kls += (lr.exp() * (lr - ls)).sum(-1).tolist()
            agree += (ls.argmax(-1) == lr.argmax(-1)).double().tolist()
    got = {}
    for rows in ("whole", 3):
        if rows != "whole":
            monkeypatch.setattr(chunked, "rows_per_block", lambda logits: 3)
        student = copy.deepcopy(student0)
        projections = []
        real_hidden = LonePolicy.hidden

        class Counting(LonePolicy):
            def hidden(self, model, seqs):
                h, w, pb = real_hidden(self, model, seqs)
                return h, (_Counted(w, projections) if model is reference else w), pb

        got[rows] = distill_step(Counting(student), None, reference, seqs, comps, None, ReheatSection(temp=1.6),
                                 0.0, 0.0)
        chunks = sum(-(-sum(len(c) for _, c in seqs[k:k + 2]) // LonePolicy.chunk_size) for k in range(0, 5, 2))
        assert len(projections) == chunks  # one reference projection per chunk, however the rows are blocked
    for m in got.values():
        assert m["kl_input"] == pytest.approx(sum(kls) / len(kls), rel=1e-5)
        assert m["top1_agreement"] == pytest.approx(sum(agree) / len(agree))
    for key in ("loss", "student_entropy", "teacher_entropy", "kl_input", "grad_norm"):
        assert got[3][key] == pytest.approx(got["whole"][key], rel=1e-6), key


class _Counted(torch.Tensor):
    """A weight that records each use of its transpose (one vocabulary projection each)."""

    @staticmethod
    def __new__(cls, w, log):
        t = w.as_subclass(cls)
        t._log = log
        return t

    @property
    def T(self):  # noqa: N802 - torch's name
        self._log.append(1)
        return self.as_subclass(torch.Tensor).T
