"""The rollout-engine interface shared by diagnose, eval, rl and reheat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    num_generations: int = 1
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class Completion:
    """One sampled completion.

    `logprobs[i]` is log softmax(logits / temperature)[token_ids[i]]: the log-probability of the sampled token
    under the temperature-scaled policy, before any top-k/top-p truncation (the policy whose ratio RL takes).
    `token_ids` include the end-of-sequence token when the model emitted it (`finish_reason == "stop"`).
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (eos or stop string) or "length"


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[str], params: SamplingParams, progress=None) -> list[Completion]:
        """`params.num_generations` completions per prompt, ordered by (prompt_index, sample_index)."""
        ...
