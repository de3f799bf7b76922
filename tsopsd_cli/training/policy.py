"""What a TS-OPSD step (training.distill) asks of the policy it trains, and nothing more: hidden states and head
weights of a micro-batch, how many passes each process runs, the collective loss guard and reductions, zeroing
gradients and the optimiser step, and the few train settings the step reads.

`StepPolicy` is the interface; `RunPolicy` provides it for a TrainingRun (its `policy`), asking the run at every
call, so that a run whose methods are wrapped (benchmarks/real_shape_vs_trl.py times them) is seen wrapped. A test
or another trainer provides it with a model and an optimiser of its own, without a run.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class StepPolicy(Protocol):
    """The trained policy as one optimiser step sees it."""

    model: torch.nn.Module  # the trained model (put in train mode by the step)
    micro_batch_size: int  # sequences per forward pass
    chunk_size: int  # tokens per chunk of the vocabulary projection
    rollout_temperature: float  # the temperature the rollout engine's log-probs were taken at

    def hidden(self, model: torch.nn.Module, seqs: list) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(final hidden states at completion positions [N, D], LM-head weight [V, D], PackedBatch) of `seqs` under
        `model`, the trained one or a frozen one."""

    def passes(self, n_local: int) -> int:
        """How many forward passes this process runs when it has `n_local` micro-batches of its own."""

    def padding_seq(self) -> tuple[list[int], list[int]]:
        """The (prompt ids, completion ids) of a padding pass, whose loss is multiplied by 0."""

    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Note a non-finite loss (decided by every process together at the optimiser step); returns the loss."""

    def global_sum(self, x: float) -> float:
        """`x` summed over every process."""

    def global_mean(self, xs: list) -> float | None:
        """The mean of every process's `xs` together (None when all are empty)."""

    def zero_grad(self) -> None:
        """Drop the trained model's gradients (set to None)."""

    def optimizer_step(self) -> float:
        """Check, clip and apply the accumulated gradients; returns the gradient norm."""

    def lr(self) -> float:
        """The learning rate of the step being taken."""


class RunPolicy:
    """`StepPolicy` over a TrainingRun: each member asks the run when it is used."""

    def __init__(self, run):
        self._run = run

    @property
    def model(self) -> torch.nn.Module:
        return self._run.model

    @property
    def micro_batch_size(self) -> int:
        return self._run.r.train.micro_batch_size

    @property
    def chunk_size(self) -> int:
        return self._run.r.train.chunk_size

    @property
    def rollout_temperature(self) -> float:
        return self._run.r.rollout.temperature

    def hidden(self, model, seqs):
        return self._run.hidden(model, seqs)

    def passes(self, n_local: int) -> int:
        return self._run.passes(n_local)

    def padding_seq(self) -> tuple[list[int], list[int]]:
        return self._run.dummy_seq()

    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self._run.guard_loss(loss)

    def global_sum(self, x: float) -> float:
        return self._run.dist.sum(x)

    def global_mean(self, xs: list) -> float | None:
        return self._run.global_mean(xs)

    def zero_grad(self) -> None:
        self._run.opt.zero_grad(set_to_none=True)

    def optimizer_step(self) -> float:
        return self._run.optimizer_step()

    def lr(self) -> float:
        return self._run.sched.get_last_lr()[0]
