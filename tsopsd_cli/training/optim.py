"""The optimiser of the training commands: AdamW on the trained (float32 master) weights, the learning-rate
schedule, and the non-finite guard that stops a run before a bad update can be saved."""

from __future__ import annotations

import math

import torch

from tsopsd_cli.errors import NonFiniteError


def build_optimizer(model, optim) -> torch.optim.Optimizer:
    """AdamW; its fused kernel (one pass over each tensor, no temporaries) where every trained parameter is a
    plain CPU/CUDA floating tensor: 5-9x faster than the per-tensor loop on CPU (measured: 40 M bf16/fp32
    parameters, 0.05 vs 0.27 s a step) and what the transformers Trainer uses by default. FSDP's DTensor
    parameters keep torch's default implementation."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                 and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=fused or None)


def build_scheduler(opt: torch.optim.Optimizer, optim, total_steps: int):
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
        if optim.schedule == "constant":
            return warm
        progress = min(1.0, step / max(1, total_steps))
        if optim.schedule == "cosine":
            return warm * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm * (1 - (1 - optim.min_lr_ratio) * progress)  # linear

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


KEPT = "the last good checkpoint is kept"


def check_finite(name: str, value: float, step: int) -> None:
    """NonFiniteError (exit 3) when a loss, gradient norm or log-prob is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteError(f"non-finite {name} ({value}) at step {step}; stopped before the update, {KEPT} "
                             "(lower the learning rate, or check the data and rewards)")


def check_weights(before: float, after: float, max_change: float | None, step: int) -> None:
    """After an optimiser step: the global weight norm must be finite, and (with `max_change`) must not have
    changed by more than that fraction, which only a diverging update does (a healthy step changes it by ~lr)."""
    if not math.isfinite(after):
        raise NonFiniteError(f"the update of step {step} made weights non-finite; {KEPT} (lower the learning "
                             "rate)")
    if max_change is not None and before > 0 and abs(after - before) / before > max_change:
        raise NonFiniteError(f"the update of step {step} changed the weight norm {before:.4g} -> {after:.4g} "
                             f"(more than optim.max_weight_norm_change = {max_change:g}): training diverged; {KEPT} "
                             "(lower the learning rate)")
