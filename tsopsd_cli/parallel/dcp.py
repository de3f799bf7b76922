"""Sharded checkpoints of a run's model and optimiser state, each process writing and reading its own shard
(torch.distributed.checkpoint), so that a run resumes on any number of processes."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """torch.distributed.checkpoint warns on stderr when it runs without a process group (one process): expected."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_state(path, model, optimizer) -> None:
    """Model and optimiser state, each process writing its own shard (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as tdc
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    with _quiet_single_process():
        tdc.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_state(path, model, optimizer) -> None:
    import torch.distributed.checkpoint as tdc
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    with _quiet_single_process():
        tdc.load(state, checkpoint_id=str(path))
    # the kernel choice (fused or foreach AdamW) belongs to this run's parameters, not to the checkpoint: a job
    # resumed on another number of processes has plain tensors where the writer had DTensors, or the reverse
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)


def save_model(path, model) -> None:
    """A (frozen) model's weights alone, sharded per process like save_state."""
    import torch.distributed.checkpoint as tdc
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    with _quiet_single_process():
        tdc.save({"model": get_model_state_dict(model)}, checkpoint_id=str(path))


def load_model(path, model) -> None:
    import torch.distributed.checkpoint as tdc
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    with _quiet_single_process():
        tdc.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
