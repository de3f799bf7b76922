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
