"""A training step's sums over every process: ddp's gradient all-reduce, and the global gradient and weight norms
that clipping and the non-finite guard read.

These sit apart from the sharding code because every strategy needs them, one process included (the norms are
then local), and because they are the step's arithmetic, not the model's wrapping: a reader of the optimiser step
finds here all that crosses processes between backward and update.
"""

from __future__ import annotations

import torch

from tsopsd_cli.parallel.group import Dist
from tsopsd_cli.parallel.sharding import Placement, local_tensor


def sync_gradients(model, pl: Placement, bucket_elems: int = 1 << 25) -> None:
    """ddp: sum every trainable parameter's gradient over processes, in buckets (no buffer the size of all
    gradients). Every process must hold a gradient for every trainable parameter (the trainer fills zeros)."""
    if pl.strategy != "ddp":
        return
    params = [p for p in model.parameters() if p.requires_grad]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket.clear()

    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= bucket_elems:
            flush()
            size = 0
    flush()


_SQ_SLICE = 1 << 20  # elements per float64 slice of a sum of squares (8 MiB)


def _sq_sum(t: torch.Tensor) -> float:
    """The sum of squares of a tensor, accumulated in float64 a slice at a time: no float64 copy of the whole
    tensor and of its square (2.5 GB for a 151,936 x 1,024 embedding or its gradient: the peak of a reheat step
    at Qwen3-0.6B's width, and 5x slower; docs/benchmarks.md). NaN or inf when any element is."""
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for i in range(0, flat.numel(), _SQ_SLICE):
        x = flat[i:i + _SQ_SLICE].double()
        total += torch.dot(x, x)
    return float(total)


def _global_sq_sum(tensors, pl: Placement, dist: Dist) -> float:
    local = sum(_sq_sum(local_tensor(t)) for t in tensors)
    return dist.sum(local) if pl.fsdp else local


def clip_grad_norm(model, max_norm: float | None, pl: Placement, dist: Dist) -> float:
    """Global gradient L2 norm over all processes' shards; gradients are scaled down to `max_norm` when above."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = _global_sq_sum(grads, pl, dist) ** 0.5
    if max_norm is not None and norm == norm and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            local_tensor(g).mul_(scale)
    return norm


def weight_norm(model, pl: Placement, dist: Dist) -> float:
    """Global L2 norm of the trained weights (NaN or inf when any weight is)."""
    return _global_sq_sum([p for p in model.parameters() if p.requires_grad], pl, dist) ** 0.5
