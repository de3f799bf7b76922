"""Differentiable per-token quantities over the full vocabulary, computed `chunk_size` tokens at a time from
hidden states, so that memory does not grow with the number of tokens x vocabulary. token_logps recomputes each
chunk's logits in the backward pass (activation checkpointing): one [chunk, V] block at a time. token_divergence
forms a chunk's student and teacher logits once ([chunk, V] each, in the compute dtype) and takes the gradients in
the forward pass; its float32 work runs a block of rows at a time (rows_per_block). Pure torch, no I/O.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tsopsd_cli.core.divergences import Divergence
from tsopsd_cli.core.stats import entropy_from_logp, kl_from_logp


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for the softmax; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _logp_entropy_block(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                        with_entropy: bool):
    """hidden: [c, D], weight: [V, D], targets: [c] -> (log p(target) [c], entropy [c] or empty)."""
    logits = _upcast(hidden @ weight.T) / temperature  # [c, V]
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = entropy_from_logp(logp_all) if with_entropy else logits.new_zeros(0)
    return logp, ent


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                chunk_size: int = 1024, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T / temperature)[target] per token, and optionally the entropy of that
    distribution, with gradients to `hidden` and `weight`.  hidden: [N, D]; weight: [V, D]; targets: [N]
    -> ([N], [N] or None), float32 (float64 for float64 inputs)."""
    logps, ents = [], []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if needs_grad:
            lp, en = checkpoint(_logp_entropy_block, h, weight, t, temperature, with_entropy, use_reentrant=False)
        else:
            lp, en = _logp_entropy_block(h, weight, t, temperature, with_entropy)
        logps.append(lp)
        ents.append(en)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the smallest set of tokens whose probability reaches `top_p` set to -inf (1.0: unchanged);
    the nucleus of top-p sampling and of a truncated teacher.  [c, V] -> [c, V]"""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def teacher_logits_at(logits: torch.Tensor, temp: float, top_p: float = 1.0) -> torch.Tensor:
    """The teacher's distribution as logits: softmax(logits / temp), restricted to its top-p nucleus and
    renormalised when top_p < 1.  [c, V] -> [c, V]"""
    return nucleus(logits / temp, top_p)


# Bytes of float32 per row block of the elementwise work on the CPU: a core's L2 cache is 1-4 MiB on current x86
# servers. The dozen passes over a block (upcast, two log-softmaxes, divergence, metrics, gradient) then run from
# cache instead of memory: at 151,936 tokens a [1024, V] float32 block is 622 MB and every pass over it went to
# DRAM, with its fresh allocation's page faults on top (docs/benchmarks.md, "Row blocks").
_CPU_BLOCK_BYTES = 5 << 19  # 2.5 MiB: 4 rows at 151,936 tokens


def rows_per_block(logits: torch.Tensor) -> int:
    """Rows of a [c, V] logit block that elementwise work over the vocabulary takes at a time (this module's
    losses, the hf engine's sampling): on the CPU, those whose float32 copy fits in _CPU_BLOCK_BYTES; on an
    accelerator, all of them (one kernel per pass, no cache to fit)."""
    if logits.device.type != "cpu":
        return max(1, logits.shape[0])
    return max(1, _CPU_BLOCK_BYTES // (4 * logits.shape[-1]))


def _chunk(h, w, want, t_logits_fn, idx, kind, beta, temp, top_p, observe, up):
    """One chunk of token_divergence: the divergences [c] and, as `want` says, their gradients to h [c, D] and to
    w [V, D] (None otherwise) for the upstream gradient `up` [c] (None: ones). No autograd graph outlives it.

    The student's and the teacher's logits are formed once, [c, V] each in the compute dtype. The elementwise
    work then runs over blocks of rows (rows_per_block): upcast, log-softmaxes, `observe`, the divergence and its
    gradient to the student's logits, which overwrites that block of the student's logits in place. Two matmuls
    take that gradient to h and w. forward_kl's gradient is written out, softmax(s) - t per token; the others take
    it from autograd on the row block."""
    with torch.no_grad():
        s_all = h @ w.T  # [c, V]
        t_all = t_logits_fn(idx)  # [c, V]
        grads = any(want)
        out = []
        n = rows_per_block(s_all)
        for r in range(0, s_all.shape[0], n):
            z = _upcast(s_all[r:r + n])  # [n, V]
            y = _upcast(t_all[r:r + n]).to(z.dtype)  # [n, V]
            lt = F.log_softmax(teacher_logits_at(y, temp, top_p), dim=-1)  # the teacher as distilled
            u = None if up is None else up[r:r + n]  # [n]
            if grads and kind != "forward_kl":
                with torch.enable_grad():
                    zg = z.detach().requires_grad_()
                    ls = F.log_softmax(zg, dim=-1)
                    d = divergence_from_logp(ls, lt, kind, beta)
                    g, = torch.autograd.grad(d, zg, torch.ones_like(d) if u is None else u.to(d.dtype))
                ls, d = ls.detach(), d.detach()
            else:
                ls = F.log_softmax(z, dim=-1)
                d = divergence_from_logp(ls, lt, kind, beta)
            if observe is not None:
                observe(idx[r:r + n], z, ls, y, lt)
            if grads:
                if kind == "forward_kl":  # d KL(t || s) / d s_logits = softmax(s) - t; ls and lt are spent
                    g = ls.exp_().sub_(lt.exp_())
                    if u is not None:
                        g.mul_(u[:, None].to(g.dtype))
                s_all[r:r + n] = g  # [n, V], cast to the compute dtype
            out.append(d)
        d = torch.cat(out)
        if not grads:
            return d, None, None
        return d, (s_all @ w if want[0] else None), (s_all.T @ h if want[1] else None)


def divergence_from_logits(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: Divergence, beta: float = 0.5):
    """Per-token divergence between teacher softmax(t_logits) and student softmax(s_logits).  [c, V] -> [c]
    (see divergence_from_logp)"""
    return divergence_from_logp(F.log_softmax(s_logits, dim=-1), F.log_softmax(t_logits, dim=-1), kind, beta)


def divergence_from_logp(ls: torch.Tensor, lt: torch.Tensor, kind: Divergence, beta: float = 0.5):
    """Per-token divergence between a teacher and a student given as log-probabilities (the teacher's may be -inf
    outside a nucleus: those terms are 0 * log 0 = 0).  [c, V] -> [c]

    forward_kl: KL(teacher || student) (mass-covering); reverse_kl: KL(student || teacher) (mode-seeking);
    jsd: beta*KL(teacher || M) + (1-beta)*KL(student || M), M = beta*teacher + (1-beta)*student
    (generalised JSD as in GKD; beta=0.5 is the symmetric JSD)."""
    if kind == "forward_kl":
        return kl_from_logp(lt, ls)
    if kind == "reverse_kl":
        if not bool((lt > float("-inf")).all()):
            raise ValueError("reverse_kl is infinite against a truncated (top-p) teacher")
        return kl_from_logp(ls, lt)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError("jsd needs 0 < beta < 1 (its limits are 0; use forward_kl or reverse_kl)")
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1.0 - beta)]), dim=0)  # log M
        return beta * kl_from_logp(lt, lm) + (1 - beta) * kl_from_logp(ls, lm)
    raise ValueError(f"unknown divergence {kind!r}")


class _Divergence(torch.autograd.Function):
    """Per-token divergences over chunks, with the gradients to the student's hidden states and head weight taken
    in the forward pass, chunk by chunk (each chunk's logits are formed once: no recomputation of the student's
    or the teacher's projection in the backward pass, as Liger's fused linear JSD does). They are kept for an
    upstream gradient that is the same for every token (a sum or mean of the divergences: the distillation loss),
    and scaled by it; any other upstream gradient recomputes the chunks (the teacher's too). Held between the
    passes: the hidden states' gradient [N, D] and the head weight's [V, D] (the one the backward pass would
    create anyway)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_logits_fn, kind, beta, temp, chunk_size, top_p, observe):
        ctx.args = (t_logits_fn, kind, beta, temp, chunk_size, top_p)
        ctx.save_for_backward(s_hidden, s_weight)
        out, ctx.g_hidden, ctx.g_weight = _over_chunks(s_hidden, s_weight, ctx.needs_input_grad[:2], *ctx.args,
                                                       observe=observe)
        return out

    @staticmethod
    def backward(ctx, grad):  # grad: [N]
        g_hidden, g_weight = ctx.g_hidden, ctx.g_weight
        ctx.g_hidden = ctx.g_weight = None
        if grad.numel() and bool((grad == grad[0]).all()):
            scale = grad[0]
            g_hidden = None if g_hidden is None else g_hidden.mul_(scale.to(g_hidden.dtype))
            g_weight = None if g_weight is None else g_weight.mul_(scale.to(g_weight.dtype))
        else:  # another upstream gradient: recompute each chunk with it
            del g_hidden, g_weight
            _, g_hidden, g_weight = _over_chunks(*ctx.saved_tensors, ctx.needs_input_grad[:2], *ctx.args, grad=grad)
        return g_hidden, g_weight, None, None, None, None, None, None, None


def _over_chunks(s_hidden, s_weight, want, t_logits_fn, kind, beta, temp, chunk_size, top_p, observe=None,
                 grad=None):
    """The divergences [N] and, as `want` says, their gradients to s_hidden [N, D] and s_weight [V, D] (None
    otherwise) for the upstream gradient `grad` [N] (None: ones), one chunk at a time (_chunk)."""
    n = s_hidden.shape[0]
    out, g_hidden, g_weight = [], [], None
    for s in range(0, n, chunk_size):
        idx = torch.arange(s, min(n, s + chunk_size), device=s_hidden.device)
        up = None if grad is None else grad[s:s + chunk_size]
        d, gh, gw = _chunk(s_hidden[s:s + chunk_size].detach(), s_weight.detach(), want, t_logits_fn, idx, kind,
                           beta, temp, top_p, observe, up)
        out.append(d)
        if gh is not None:
            g_hidden.append(gh)
        if gw is not None:
            g_weight = gw if g_weight is None else g_weight.add_(gw)
    return torch.cat(out), (torch.cat(g_hidden) if want[0] else None), g_weight


def token_divergence(s_hidden: torch.Tensor, s_weight: torch.Tensor,
                     t_logits_fn: Callable[[torch.Tensor], torch.Tensor], kind: str = "forward_kl",
                     beta: float = 0.5, temp: float = 1.0, chunk_size: int = 1024,
                     teacher_top_p: float = 1.0, observe: Callable | None = None) -> torch.Tensor:
    """Per-token divergence between a teacher softmax(t_logits / temp) (restricted to its top-p nucleus when
    teacher_top_p < 1) and the student softmax(s_hidden @ s_weight.T), with gradients to the student only.
    s_hidden: [N, D]; s_weight: [V, D];
    t_logits_fn(idx [c]) -> teacher logits [c, V] for those token indices (computed chunk by chunk, no grad).
    -> [N] float32 (float64 for float64 inputs)

    With gradients, every chunk's logits are formed once, in the forward pass, which also takes the gradients
    (`_Divergence`): the backward pass of a loss that sums or averages the result only scales them. Memory beyond
    the inputs and gradients: the student's and the teacher's [chunk, V] logits in the compute dtype, and a few
    rows of float32 work on the CPU (rows_per_block).

    `observe(idx [n], student logits [n, V], student log-probs [n, V], teacher logits [n, V], log-probs of the
    teacher as distilled [n, V])`, when given, is called once per block of rows of the forward pass (n rows: the
    whole chunk on an accelerator, a few rows on the CPU, see rows_per_block), under no_grad, with the blocks the
    loss computes anyway (float32 or wider): statistics of the step then cost no LM-head projection of their own.
    Blocks are overwritten afterwards: observe reduces them, it does not keep them."""
    if torch.is_grad_enabled() and (s_hidden.requires_grad or s_weight.requires_grad):
        return _Divergence.apply(s_hidden, s_weight, t_logits_fn, kind, beta, temp, chunk_size, teacher_top_p,
                                 observe)
    with torch.no_grad():
        return _over_chunks(s_hidden, s_weight, (False, False), t_logits_fn, kind, beta, temp, chunk_size,
                            teacher_top_p, observe)[0]
