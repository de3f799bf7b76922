"""Rollout engines behind one interface (`Engine`), built by one factory (`open_engine`) from a registry.

Adding an engine: one module with a class implementing `Engine` (and the three class-level hooks below), plus one
`register(...)` line here.
"""

from __future__ import annotations

import importlib

from tsopsd_cli.engines.base import (Completion, Engine, SamplingParams, check_context, checkpoint_end_token_ids,
                                     context_length, encode_prompts, end_token_ids)

# name -> (module, class). Modules are imported only when their engine is asked for (vLLM is heavy/optional).
_REGISTRY: dict[str, tuple[str, str]] = {}


def register(name: str, module: str, cls: str) -> None:
    _REGISTRY[name] = (module, cls)


register("hf", "tsopsd_cli.engines.hf", "HFEngine")
register("vllm", "tsopsd_cli.engines.vllm", "VLLMEngine")


def names() -> list[str]:
    return list(_REGISTRY)


def engine_class(name: str):
    """The class registered as `name`. Besides the `Engine` methods it has `needs_model` (True: it samples from a
    transformers model the caller loads; False: it loads the checkpoint itself), `check_installed()` (raise
    MissingDependencyError, exit 4, when its package is missing or too old) and `from_recipe(...)`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown engine {name!r} (known: {', '.join(_REGISTRY)})")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def require(name: str) -> None:
    """Before any work: an engine that is asked for and not installed stops the command (exit 4, one line)."""
    engine_class(name).check_installed()


def open_engine(name: str, tokenizer, *, model=None, checkpoint=None, model_section=None, rollout=None,
                batch_size: int | None = None, sample_context=None, log=None) -> Engine:
    """The engine `name` (a recipe's `rollout.engine`) for one checkpoint: engines with `needs_model` sample from
    `model` (`sample_context()`, when given, is entered around each `generate`, e.g. to gather FSDP parameters) in
    `model_section`'s dtype; the others load `checkpoint` themselves with the recipe's `model_section` and `rollout`
    settings. `batch_size`: sequences per batch (default `rollout.batch_size`). `log` gets one-line messages."""
    return engine_class(name).from_recipe(tokenizer, model=model, checkpoint=checkpoint, model_section=model_section,
                                          rollout=rollout, batch_size=batch_size, sample_context=sample_context,
                                          log=log)


def sampling_params(section, **overrides) -> SamplingParams:
    """SamplingParams from a recipe's rollout (or validation) section, with `overrides` (e.g. row_seeds)."""
    fields = dict(num_generations=section.num_generations, temperature=section.temperature,
                  top_p=getattr(section, "top_p", 1.0), top_k=getattr(section, "top_k", 0),
                  max_new_tokens=section.max_new_tokens, stop=tuple(getattr(section, "stop", ())),
                  seed=getattr(section, "seed", 0))
    fields.update(overrides)
    return SamplingParams(**fields)


__all__ = ["Completion", "Engine", "SamplingParams", "check_context", "checkpoint_end_token_ids", "context_length",
           "encode_prompts", "end_token_ids", "engine_class", "names", "open_engine", "register", "require",
           "sampling_params"]
