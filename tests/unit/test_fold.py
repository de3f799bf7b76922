from __future__ import annotations

import pytest
import torch

from tsopsd_cli.checkpoint import load_checkpoint
from tsopsd_cli.errors import CheckpointError
from tsopsd_cli.runners.reheat import fold_temperature


def test_fold_divides_every_logit_by_tau(tiny_ckpt):
    ld = load_checkpoint(tiny_ckpt, device="cpu")
    ids = torch.tensor([ld.tokenizer("((7+5)*3)-4=?\n5+7=12\n")["input_ids"]])
    with torch.no_grad():
        before = ld.model(input_ids=ids).logits
    err = fold_temperature(ld.model, ld.tokenizer, 1.6)
    with torch.no_grad():
        after = ld.model(input_ids=ids).logits
    torch.testing.assert_close(after, before / 1.6, atol=1e-5, rtol=1e-5)
    assert err < 1e-4


def test_fold_refuses_where_it_is_not_exact():
    from transformers import GPT2Config, GPT2LMHeadModel

    from tsopsd_cli.tasks import toy

    tok = toy.build_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    with pytest.raises(CheckpointError, match="final norm has a bias"):
        fold_temperature(model, tok, 1.6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fold_works_in_low_precision_with_its_measured_error(tiny_ckpt, dtype):
    """The GPU default: the tolerance follows the model's dtype (it was the float32 one, so bf16 was refused)."""
    from tsopsd_cli.recipe import ModelSection

    ld = load_checkpoint(tiny_ckpt, ModelSection(dtype=dtype, device="cpu"))
    err = fold_temperature(ld.model, ld.tokenizer, 1.6)
    assert 0 <= err < 16 * torch.finfo(getattr(torch, dtype)).eps * 10


def test_fold_on_tied_embeddings(tmp_path):
    """Tied input/output embeddings (Qwen3-4B): only the final norm changes, so the embeddings stay tied and
    unscaled while the logits are divided."""
    from transformers import Qwen3ForCausalLM

    from tsopsd_cli.tasks import toy

    tok = toy.build_tokenizer()
    cfg = toy.build_model_config(len(tok), 32, 2, 2, 64, 64, tok.pad_token_id, tok.eos_token_id)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    ids = torch.tensor([tok("(3+4)*2=?\n")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fold_temperature(model, tok, 2.0)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before / 2.0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.embed_tokens.weight, emb)
