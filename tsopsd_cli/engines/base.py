"""The rollout-engine interface shared by diagnose, eval, rl and reheat."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterable
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
    # Per-prompt seeds: completion (i, j) then draws its randomness from a generator seeded by
    # (row_seeds[i], j) alone, so it does not depend on which other prompts share its batch (several processes,
    # resumed runs). None: one generator seeded by `seed` for the whole call.
    row_seeds: tuple[int, ...] | None = None


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
    entropies: list[float] | None = None  # entropy of the sampling distribution at each step (hf engine)

    @property
    def mean_entropy(self) -> float | None:
        """Mean entropy of the temperature-scaled sampling distribution over this completion's tokens; engines
        that do not see full distributions (vLLM) give the mean negative log-prob, its unbiased estimate."""
        if not self.token_ids:
            return None
        if self.entropies is not None:
            return sum(self.entropies) / len(self.entropies)
        return -sum(self.logprobs) / len(self.logprobs) if self.logprobs else None


class Engine(Protocol):
    """What every rollout engine implements (docs/engines.md, "Adding an engine"). Engines are built by
    `tsopsd_cli.engines.open_engine` from their registration; nothing outside `tsopsd_cli.engines` asks which
    engine it holds."""

    name: str
    # True when the engine samples from the trainer's own parameters (hf): its log-probs are the trainer's, there
    # is nothing to sync and no engine/trainer mismatch to measure.
    samples_from_trainer_weights: bool

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress=None) -> list[Completion]:
        """`params.num_generations` completions per prompt (token ids), ordered by (prompt_index, sample_index).
        `progress(n)` is called as sequences finish. Takes back the engine's memory first if it was released."""
        ...

    def with_batch_size(self, batch_size: int) -> "Engine":
        """The same engine sampling at most `batch_size` sequences at once (itself when it batches on its own)."""
        ...

    def sync_weights(self, named_tensors: Iterable[tuple[str, object]]) -> float | None:
        """Load the trainer's (name, tensor) pairs into the engine; seconds taken, or None (without consuming the
        iterator) when the engine samples from the trainer's weights."""
        ...

    def release(self) -> None:
        """Give the accelerator memory the engine holds to the trainer (before training and before any gather)."""
        ...

    def acquire(self) -> None:
        """Take the memory back before sampling (`generate` does it too)."""
        ...

    def own_logprobs(self, comps: list[Completion]) -> list[list[float]] | None:
        """The engine's log-probs of the sampled tokens when they come from another forward than the trainer's
        (to measure and correct the mismatch); None when they are the trainer's own."""
        ...

    def check_sync(self, logprob_diff: float | None, step: int) -> None:
        """Given the step's `engine_logprob_diff` (a global mean: the same on every process), raise
        WeightSyncError when the engine's weights evidently are not the trainer's (a no-op without a sync)."""
        ...

    def close(self) -> None:
        """Free everything the engine holds; a new engine can start after it."""
        ...


def end_token_ids(tokenizer, *configs) -> tuple[int, ...]:
    """Every token id that ends a completion, in one place for every engine: the tokenizer's eos, then the
    `eos_token_id` of each config given (the checkpoint's config.json and generation_config.json, as objects or
    dicts; an int or a list), without repeats. A Qwen3 instruct checkpoint lists [<|im_end|>, <|endoftext|>]; a
    base checkpoint read with an instruct tokenizer ends with <|endoftext|> although the tokenizer's eos is
    <|im_end|>: both must stop a completion."""
    ids: list[int] = []

    def add(x) -> None:
        if x is None:
            return
        if isinstance(x, (list, tuple, set)):
            for y in x:
                add(y)
        elif int(x) not in ids:
            ids.append(int(x))

    add(getattr(tokenizer, "eos_token_id", None))
    for c in configs:
        if c is None:
            continue
        add(c.get("eos_token_id") if isinstance(c, dict) else getattr(c, "eos_token_id", None))
    return tuple(ids)


def checkpoint_end_token_ids(path, tokenizer) -> tuple[int, ...]:
    """`end_token_ids` of a checkpoint directory: its tokenizer, config.json and generation_config.json."""
    import json
    from pathlib import Path

    configs = []
    for name in ("config.json", "generation_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                configs.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                pass  # an unreadable generation config names no end token; loading reports a bad config.json
    return end_token_ids(tokenizer, *configs)


def encode_prompts(tokenizer, texts: list[str], chat_template: bool = False) -> list[list[int]]:
    """Token ids of prompts: plain text with the tokenizer's usual special tokens (e.g. BOS), or with
    `chat_template` a single user turn followed by the generation prompt."""
    if not chat_template:
        return [tokenizer(t)["input_ids"] for t in texts]
    if not getattr(tokenizer, "chat_template", None):
        from tsopsd_cli.errors import DataError

        raise DataError("chat_template is on but this tokenizer has no chat template")
    out = []
    for t in texts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def context_length(config) -> int | None:
    """The longest sequence (prompt and completion together) a checkpoint's model takes: max_position_embeddings
    of its config (config.json as a dict, or a transformers config); None when it declares none."""
    n = config.get("max_position_embeddings") if isinstance(config, dict) else \
        getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_context(lengths: list[int], context: int | None, what: str, whole: bool = False) -> None:
    """The context check of every command (diagnose, eval, rl, reheat, validation sets): refuse (DataError,
    exit 2, with the counts) the `what` whose token `lengths` the model's context cannot take: a prompt that leaves
    no room for a completion, or with `whole` (teacher-forced prompt and completion) a sequence longer than the
    context. A prompt that leaves less room than max_new_tokens is not refused (docs/cli.md, "Context")."""
    over = [n for n in lengths if (n > context if whole else n >= context)] if context else []
    if over:
        limit = "longer than" if whole else "as long as or longer than"
        from tsopsd_cli.errors import DataError

        raise DataError(f"{len(over)} of {len(lengths)} {what} are {limit} the model's context ({context} tokens; "
                        f"the longest has {max(over)}): shorten or drop them")
