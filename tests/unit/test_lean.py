"""The lean paths (tsopsd_cli.lean) compute what the transformers forward computes: decoding, and the training
forward with shared prompts (values and gradients)."""

import pytest
import torch

from tsopsd_cli.engines import SamplingParams
from tsopsd_cli.engines.hf import HFEngine
from tsopsd_cli.lean import LeanDecoder, shared_prefix_hidden, supports
from tsopsd_cli.modeling import completion_hidden, pack


def _model(kind: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, max_position_embeddings=128, pad_token_id=0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    elif kind == "qwen2":  # biases on q/k/v
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # norms away from 1, so that a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _seqs(g: torch.Generator):
    """Sequences as GRPO makes them: prompts of different lengths, each with several completions of different
    lengths (one of a single token), the groups interleaved; the pad id (0) is sampled too, as a real token."""
    prompts = [torch.randint(1, 101, (n,), generator=g).tolist() for n in (5, 9, 2)]
    out = []
    for k, n in enumerate((7, 1, 12, 4, 9, 3, 6)):
        out.append((prompts[k % 3], torch.randint(1, 101, (n,), generator=g).tolist()))
    out[0][1][2] = out[2][1][5] = 0
    return out


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_lean_logits_match_transformers_at_every_step(kind):
    model = _model(kind)
    assert supports(model)
    g = torch.Generator().manual_seed(1)
    B, P, steps = 3, 7, 5
    ids = torch.randint(1, 101, (B, P + steps), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[0, :3] = 0  # left padding of different lengths
    mask[1, :1] = 0
    ids[:, :P][mask == 0] = 0
    dec = LeanDecoder(model)
    got = [dec.prefill(ids[:, :P], mask, steps)]
    for t in range(steps - 1):
        got.append(dec.step(ids[:, P + t]))
    full_mask = torch.cat([mask, torch.ones(B, steps, dtype=torch.long)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=full_mask, position_ids=pos).logits
    for t, logits in enumerate(got):
        torch.testing.assert_close(logits, want[:, P - 1 + t], atol=1e-5, rtol=1e-4)


def test_engine_paths_sample_the_same_tokens(tiny_ckpt):
    from tsopsd_cli.checkpoint import load_checkpoint

    ld = load_checkpoint(tiny_ckpt, device="cpu")
    model, tok = ld.model, ld.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("1+2=?\n", "(3*4)-5=?\n", "7=?\n")]
    params = SamplingParams(num_generations=2, temperature=1.0, max_new_tokens=12, row_seeds=(5, 6, 7))
    lean = HFEngine(model, tok, batch_size=4).generate(prompts, params)
    ref = HFEngine(model, tok, batch_size=4, lean=False).generate(prompts, params)
    assert HFEngine(model, tok).lean
    assert [c.token_ids for c in lean] == [c.token_ids for c in ref]
    for a, b in zip(lean, ref, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.entropies == pytest.approx(b.entropies, abs=1e-4)


@pytest.mark.slow
def test_dropping_finished_rows_changes_no_sample(toy_base):
    """A trained toy model ends completions at different lengths, so the lean path compacts its batch mid-way;
    every completion must still equal the transformers path's under per-row seeds."""
    from tsopsd_cli.checkpoint import load_checkpoint
    from tsopsd_cli.tasks import toy

    ld = load_checkpoint(toy_base, device="cpu")
    probs = toy.make_problems("test", 24, seed=3)
    prompts = [ld.tokenizer(p.prompt)["input_ids"] for p in probs]
    params = SamplingParams(num_generations=2, temperature=1.0, max_new_tokens=40, row_seeds=tuple(range(24)))
    lean = HFEngine(ld.model, ld.tokenizer, batch_size=48).generate(prompts, params)
    ref = HFEngine(ld.model, ld.tokenizer, batch_size=48, lean=False).generate(prompts, params)
    lengths = sorted(len(c.token_ids) for c in lean)
    assert lengths[len(lengths) // 2] < lengths[-1]  # half had finished before the longest: compaction happened
    assert [c.token_ids for c in lean] == [c.token_ids for c in ref]
    for a, b in zip(lean, ref, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4) and a.finish_reason == b.finish_reason


def _grads(model, hidden):
    params = [p for p in model.model.parameters() if p.requires_grad]  # the LM head takes no part
    weights = torch.linspace(-1, 1, hidden.numel(), dtype=hidden.dtype).view_as(hidden)
    return torch.autograd.grad((hidden * weights).sum(), params)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_shared_prefix_forward_matches_transformers_values_and_gradients(kind):
    model = _model(kind).double()
    assert supports(model)
    seqs = _seqs(torch.Generator().manual_seed(2))
    want = completion_hidden(model, pack(seqs, 0, "cpu"))[0]
    got = shared_prefix_hidden(model, seqs)
    assert got.shape == want.shape == (sum(len(c) for _, c in seqs), 64)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    # RMSNorm takes its statistics in float32 even in a float64 model (as transformers does), so gradients
    # summed in another order (a shared prompt gathers its completions' gradients) agree to float32 rounding
    lean_grads = _grads(model, got)
    for a, b in zip(lean_grads, _grads(model, want), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)
    ckpt = shared_prefix_hidden(model, seqs, checkpoint_layers=True)  # recomputed layers: the same gradients
    for a, b in zip(_grads(model, ckpt), lean_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_shared_prefix_forward_with_single_token_completions_and_float32():
    model = _model("qwen3")
    g = torch.Generator().manual_seed(3)
    seqs = [([4, 5, 6], [7]), ([4, 5, 6], [9]), ([8], [3])]  # nothing to feed past the prompts
    torch.testing.assert_close(shared_prefix_hidden(model, seqs), completion_hidden(model, pack(seqs, 0, "cpu"))[0],
                               atol=1e-5, rtol=1e-4)
    seqs = _seqs(g)
    torch.testing.assert_close(shared_prefix_hidden(model, seqs), completion_hidden(model, pack(seqs, 0, "cpu"))[0],
                               atol=1e-5, rtol=1e-4)


def test_training_forward_follows_model_lean(tiny_ckpt, tmp_path):
    """rl with model.lean on and off: the same losses and weights after a step, up to float rounding."""
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.rl import RLRunner

    params, batch, calls = [], None, []  # calls: (loss, gradient norm)
    for lean in (True, False):
        r = build_recipe("rl", None, parse_set_options([
            "data.num_prompts=8", "train.prompts_per_step=2", "rollout.num_generations=4",
            "rollout.max_new_tokens=10", "validation.enabled=false", "optim.lr=1e-3", "train.max_steps=1",
            "optim.eps=1.0",  # Adam's first step is then ~ lr * gradient, not lr * sign(gradient)
            "grpo.reward=tests.rewards:even_length", f"model.lean={str(lean).lower()}",
            f"output.out={tmp_path / str(lean)}"]))
        run = RLRunner(r, str(tiny_ckpt))
        run.setup()
        assert run.engine.lean is lean
        batch = batch or run.rollout()
        m = run.train_on(batch)
        calls.append((m["loss"], m["grad_norm"]))
        params.append(torch.cat([p.detach().flatten() for p in run.model.parameters()]))
        run.close()
    assert calls[0] == pytest.approx(calls[1], rel=1e-4, abs=1e-7)
    torch.testing.assert_close(params[0], params[1], atol=1e-7, rtol=1e-5)


def _gqa_model(n_kv: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=n_kv, head_dim=16, intermediate_size=96,
                                         max_position_embeddings=512, pad_token_id=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval().double()


@pytest.mark.parametrize("n_kv", [1, 2, 4])  # multi-query, grouped-query, plain multi-head
@pytest.mark.parametrize("lengths", [
    ((3,), (2, 2)),  # one prompt, two short completions
    ((1, 17, 6), (40, 1, 33, 2, 41, 5, 9)),  # a one-token prompt; completions as long as and longer than prompts
    ((64, 5), (150, 3, 120, 150)),  # prompts padded by 59 positions; completions of several lengths per prompt
])
def test_shared_prefix_forward_float64_lengths_and_head_groupings(n_kv, lengths):
    """float64: the lean forward equals transformers' at several prompt/completion lengths, with the prompts'
    right padding, several completions per prompt, and 1, 2 or 4 key/value heads for 4 query heads."""
    model = _gqa_model(n_kv)
    g = torch.Generator().manual_seed(n_kv)
    prompts = [torch.randint(1, 101, (n,), generator=g).tolist() for n in lengths[0]]
    seqs = [(prompts[k % len(prompts)], torch.randint(0, 101, (n,), generator=g).tolist())
            for k, n in enumerate(lengths[1])]
    want = completion_hidden(model, pack(seqs, 0, "cpu"))[0]
    got = shared_prefix_hidden(model, seqs)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    for a, b in zip(_grads(model, got), _grads(model, want), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward kernels alike)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("checkpoint_layers", [False, True])
def test_shared_prefix_forward_forms_no_length_squared_tensor(checkpoint_layers):
    """Two 3,000-token completions sharing a prompt: a mask [B, 1, C, P + C] would hold 18 M elements, scores
    [B, H, C, P + C] 72 M; every tensor of the forward and backward (attention included: the fused kernel) stays
    below C^2 / 8 = 1.1 M — memory linear in the length."""
    model = _model("qwen3")  # 4 query heads, 2 key/value heads
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, 101, (20,), generator=g).tolist()
    C = 3000
    seqs = [(prompt, torch.randint(1, 101, (C,), generator=g).tolist()) for _ in range(2)]
    with _LargestTensor() as seen:
        h = shared_prefix_hidden(model, seqs, checkpoint_layers=checkpoint_layers)
        h.square().mean().backward()
    assert h.shape == (2 * C, 64)
    assert seen.numel < C * C // 8, (seen.numel, seen.op)


def test_shared_prefix_forward_through_fsdp_layer_hook(tmp_path):
    """The FSDP path (one-process gloo group, FSDP2 on every layer and the root, layer_hook routing each layer
    through its module): the same values and gradients as the plain model."""
    import copy

    from tsopsd_cli.parallel import sharding

    model = _gqa_model(2)
    plain = copy.deepcopy(model)
    seqs = _seqs(torch.Generator().manual_seed(6))
    want = shared_prefix_hidden(plain, seqs)
    want_grads = _grads(plain, want)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        pl = sharding.Placement(strategy="fsdp", device=torch.device("cpu"), master_dtype=torch.float64,
                                compute_dtype=torch.float64, frozen_sharded=True, world=1)
        sharded = sharding.prepare(model, pl, trainable=True)
        assert sharding.layer_hook(sharded) is not None
        got = sharding.call(sharded, lambda m: shared_prefix_hidden(m, seqs, checkpoint_layers=True,
                                                                    layer_hook=sharding.layer_hook(m)), sharded)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
        weights = torch.linspace(-1, 1, got.numel(), dtype=got.dtype).view_as(got)
        (got * weights).sum().backward()
        names = [n for n, p in plain.model.named_parameters() if p.requires_grad]
        grads = dict(sharded.model.named_parameters())
        for name, b in zip(names, want_grads, strict=True):
            a = grads[name].grad.full_tensor()
            torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)
    finally:
        torch.distributed.destroy_process_group()


def test_tied_embedding_lookup_gradient_is_sparse_and_adds_into_the_head_gradient(monkeypatch):
    """With the loss through a tied LM head, the lean lookup's gradient is sparse (no second [V, D] buffer in the
    backward pass) and the parameter's gradient is the same dense one as with a dense lookup; without
    `head_in_loss`, or untied, the lookup stays dense."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tsopsd_cli import lean
    from tsopsd_cli.core.chunked import token_logps

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                         max_position_embeddings=128, pad_token_id=0,
                                         tie_word_embeddings=True)).double()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    seqs = _seqs(torch.Generator().manual_seed(3))
    pb = pack(seqs, 0, "cpu")
    lookups = []
    real = lean.F.embedding
    monkeypatch.setattr(lean.F, "embedding", lambda *a, **k: lookups.append(k["sparse"]) or real(*a, **k))
    grads = {}
    for head_in_loss in (False, True):
        model.zero_grad(set_to_none=True)
        hidden = shared_prefix_hidden(model, seqs, head_in_loss=head_in_loss)
        weight = model.get_output_embeddings().weight
        token_logps(hidden, weight, pb.targets, 1.0, 16)[0].sum().backward()
        assert weight.grad.layout == torch.strided and not weight.grad.is_sparse
        grads[head_in_loss] = weight.grad.clone()
    assert lookups == [False, False, True, True]  # prompt and completion lookups, dense then sparse
    torch.testing.assert_close(grads[True], grads[False], atol=1e-12, rtol=1e-10)
    untied = _model("qwen3").double()  # untied: dense whatever the caller says
    lookups.clear()
    shared_prefix_hidden(untied, seqs, head_in_loss=True)
    assert lookups == [False, False]
