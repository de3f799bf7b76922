"""Hidden states at completion positions, without ever forming full-sequence logits.

A sequence is (prompt ids, completion ids). The distribution that produced completion token t lives at the
position before it, so the positions read are prompt_len - 1 ... prompt_len + completion_len - 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from tsopsd_cli.errors import CheckpointError


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N] batch row of each completion token
    cols: torch.Tensor  # [N] position whose output predicts that token
    targets: torch.Tensor  # [N] the completion token ids
    completion_pos: torch.Tensor  # [N] 0-based index of the token inside its completion (CPU)


def pack(seqs: list[tuple[list[int], list[int]]], pad_id: int, device) -> PackedBatch:
    """Right-pad (prompt + completion) sequences and index their completion tokens."""
    full = [p + c for p, c in seqs]
    width = max(len(x) for x in full)
    ids = torch.full((len(full), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(full), width), dtype=torch.long)
    rows, cols, targets, cpos = [], [], [], []
    for r, ((p, c), x) in enumerate(zip(seqs, full)):
        if not p:
            raise ValueError("every sequence needs at least one prompt token")
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x)] = 1
        rows += [r] * len(c)
        cols += range(len(p) - 1, len(p) - 1 + len(c))
        targets += c
        cpos += range(len(c))
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return PackedBatch(ids.to(device), mask.to(device), t(rows).to(device), t(cols).to(device),
                       t(targets).to(device), t(cpos))


def decoder_and_head(model):
    """The transformer body (returning final-normed hidden states) and the LM head of a causal LM."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or decoder is None:
        raise CheckpointError(f"{type(model).__name__}: cannot separate the transformer body from its LM head")
    return decoder, head


def check_head_matches(model, tokenizer) -> None:
    """The chunked path assumes logits == lm_head(final hidden); refuse models that post-process logits
    (soft-capping, logit scaling) rather than report wrong numbers."""
    decoder, head = decoder_and_head(model)
    dev = next(model.parameters()).device
    ids = torch.tensor([tokenizer("1 + 1 = 2")["input_ids"][:8] or [0]], device=dev)
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        got = head(decoder(input_ids=ids).last_hidden_state).float()
    if not torch.allclose(want, got, atol=1e-3 * max(1.0, float(want.abs().max())), rtol=1e-2):
        raise CheckpointError(f"{type(model).__name__}: its logits are not lm_head(hidden states) "
                              "(soft-capping or logit scaling); the chunked statistics would be wrong")


def completion_hidden(model, batch: PackedBatch, all_layers: bool = False):
    """Final hidden states at the completion-predicting positions: [N, D]; with `all_layers`, also the
    output of every decoder layer (embeddings excluded) at those positions: list of [N, D]."""
    decoder, _ = decoder_and_head(model)
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  output_hidden_states=all_layers, use_cache=False)
    last = out.last_hidden_state[batch.rows, batch.cols]  # [N, D]
    layers = None
    if all_layers:
        layers = [h[batch.rows, batch.cols] for h in out.hidden_states[1:]]
    return last, layers


def persistent_buffers(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, buffer) of every buffer a state dict holds (rotary tables and other non-persistent ones left out)."""
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf
