"""What a prompt source hands to the runners."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the text the model is conditioned on, exactly as it is tokenized
    answer: str | None = None  # gold answer, when known
    meta: dict = field(default_factory=dict)
