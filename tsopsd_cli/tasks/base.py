"""What a prompt source hands to the runners."""

from __future__ import annotations

from dataclasses import dataclass, field


def answer_text(value) -> str:
    """A gold answer as text: JSON floats that are integers lose their '.0' (AMC's 27.0 -> '27'); a list gives its
    first element (OlympiadBench); surrounding whitespace is dropped."""
    if isinstance(value, list):
        return answer_text(value[0]) if value else ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the text the model is conditioned on, exactly as it is tokenized
    answer: str | None = None  # gold answer, when known
    meta: dict = field(default_factory=dict)
