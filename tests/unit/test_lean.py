"""The lean decode path (engines.lean) computes what the transformers forward computes."""

import pytest
import torch

from tsopsd_cli.engines import SamplingParams
from tsopsd_cli.engines.hf import HFEngine
from tsopsd_cli.engines.lean import LeanDecoder, supports


def _model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, max_position_embeddings=128, pad_token_id=0)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


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
    for a, b in zip(lean, ref):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.entropies == pytest.approx(b.entropies, abs=1e-4)


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
    for a, b in zip(lean, ref):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4) and a.finish_reason == b.finish_reason
