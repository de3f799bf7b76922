"""The training prompts as a run consumes them: an endless sequence of problems, reshuffled every epoch by a seeded
permutation, whose position is part of a run's resumable state."""

from __future__ import annotations

import torch

from tsopsd_cli.errors import DataError
from tsopsd_cli.tasks.base import Problem


class PromptStream:
    """An endless, reshuffled-every-epoch sequence of problems; its position is part of the resumable state."""

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise DataError("no training prompts")
        self.problems = problems
        self.seed = seed
        self.position = 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.problems), generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def take(self, k: int) -> list[tuple[int, Problem]]:
        """The next k problems with their global stream positions."""
        out = []
        for pos in range(self.position, self.position + k):
            epoch, i = divmod(pos, len(self.problems))
            out.append((pos, self.problems[self._order(epoch)[i]]))
        self.position += k
        return out
