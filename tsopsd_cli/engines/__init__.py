"""Rollout engines behind one interface (`Engine`)."""

from __future__ import annotations

from tsopsd_cli.engines.base import Completion, Engine, SamplingParams, encode_prompts


def make_engine(name: str, model, tokenizer, batch_size: int = 64, lean: bool = True) -> Engine:
    if name == "hf":
        from tsopsd_cli.engines.hf import HFEngine

        return HFEngine(model, tokenizer, batch_size=batch_size, lean=lean)
    raise ValueError(f"unknown engine {name!r}")


def sampling_params(rollout) -> SamplingParams:
    """SamplingParams from a recipe's rollout section."""
    return SamplingParams(num_generations=rollout.num_generations, temperature=rollout.temperature,
                          top_p=rollout.top_p, top_k=rollout.top_k, max_new_tokens=rollout.max_new_tokens,
                          stop=tuple(rollout.stop), seed=rollout.seed)


__all__ = ["Completion", "Engine", "SamplingParams", "encode_prompts", "make_engine", "sampling_params"]
