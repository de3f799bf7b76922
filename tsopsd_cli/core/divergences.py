"""The divergences a TS-OPSD step can minimise, by name: the one list that recipes, the CLI's help and
core.chunked's dispatch share (torch-free, so reading a recipe does not import torch)."""

from __future__ import annotations

from typing import Literal, get_args

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
