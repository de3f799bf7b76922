"""The engine interface and the vLLM engine's GPU-only behaviour, on CPU: a fake `vllm` package stands in for the
library (it records the calls), and `torch.cuda.*` is mocked where only a GPU has it. What is checked is what TRL
and verl do on GPUs (trl/generation/vllm_generation.py; verl/workers/fsdp_workers.py): one engine per torchrun
process on its own GPU, PyTorch's cache emptied before every wake, and a version check that names the floor."""

from __future__ import annotations

import dataclasses
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tsopsd_cli import engines
from tsopsd_cli.errors import MissingDependencyError


class FakeLLM:
    """Records its construction and the calls the engine makes, in order, into `FakeLLM.calls`."""

    calls: list = []
    kwargs: dict = {}

    def __init__(self, **kwargs):
        FakeLLM.kwargs = kwargs
        FakeLLM.calls.append(("LLM",))
        text_config = SimpleNamespace(tie_word_embeddings=False)
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(dtype=torch.bfloat16, max_model_len=256, hf_text_config=text_config),
            model_executor=sys.modules["vllm.v1.executor.uniproc_executor"].UniProcExecutor())

    def enqueue(self, *a, **k):
        return []

    def collective_rpc(self, method, kwargs=None):
        FakeLLM.calls.append(("collective_rpc", method, [name for name, _ in kwargs["weights_iterator"]]))

    def apply_model(self, fn):
        return []

    def reset_prefix_cache(self):
        FakeLLM.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        FakeLLM.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        FakeLLM.calls.append(("wake_up", tuple(tags or ())))


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` package with what the engine calls; `torch.cuda.is_available` is True and `empty_cache` /
    `set_device` are recorded in the same call list as the engine's calls."""
    FakeLLM.calls = []
    FakeLLM.kwargs = {}

    @dataclasses.dataclass
    class EngineArgs:
        logprobs_mode: str = "raw_logprobs"
        kv_cache_memory_bytes: int | None = None

    class SamplingParams:
        __struct_fields__ = ("n", "temperature", "flat_logprobs")

    mods = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.platforms", "vllm.engine", "vllm.engine.arg_utils", "vllm.model_executor",
        "vllm.model_executor.model_loader", "vllm.model_executor.model_loader.reload", "vllm.v1",
        "vllm.v1.executor", "vllm.v1.executor.uniproc_executor")}
    mods["vllm"].__version__ = "0.33.0"
    mods["vllm"].LLM = type("LLM", (FakeLLM,), {})
    mods["vllm"].SamplingParams = SamplingParams
    mods["vllm.platforms"].current_platform = SimpleNamespace(is_sleep_mode_available=lambda: True)
    mods["vllm.engine.arg_utils"].EngineArgs = EngineArgs
    mods["vllm.v1.executor.uniproc_executor"].UniProcExecutor = type("UniProcExecutor", (), {})
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: FakeLLM.calls.append(("empty_cache",)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: FakeLLM.calls.append(("set_device", d)))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return mods


OPTIONS = SimpleNamespace(gpu_memory_utilization=0.5, tensor_parallel_size=1, enforce_eager=True,
                          enable_prefix_caching=True, sleep_mode=True, sleep_level=1)


def make(tmp_path, **kw):
    from tsopsd_cli.engines.vllm import VLLMEngine

    return VLLMEngine(str(tmp_path), SimpleNamespace(eos_token_id=0), OPTIONS, log=lambda m: None, **kw)


def test_under_torchrun_each_rank_s_engine_is_launched_externally_and_keeps_its_own_gpu(fake_vllm, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    make(tmp_path)
    assert FakeLLM.kwargs["distributed_executor_backend"] == "external_launcher"
    # the current device is set back to this rank's GPU after vLLM started
    assert FakeLLM.calls.index(("set_device", 3)) > FakeLLM.calls.index(("LLM",))


def test_a_single_process_keeps_vllm_s_default_executor(fake_vllm, tmp_path):
    make(tmp_path)
    assert "distributed_executor_backend" not in FakeLLM.kwargs
    assert not [c for c in FakeLLM.calls if c[0] == "set_device"]


def test_pytorch_s_cache_is_emptied_before_every_wake(fake_vllm, tmp_path):
    engine = make(tmp_path)
    assert engine.can_sleep
    engine.release()  # before training
    assert ("sleep", 1) in FakeLLM.calls and engine.asleep
    FakeLLM.calls.clear()
    engine.sync_weights(iter([("model.embed_tokens.weight", torch.zeros(2))]))  # wakes the weights first
    engine.acquire()  # then the KV cache
    names = [c[0] for c in FakeLLM.calls]
    assert names == ["empty_cache", "wake_up", "collective_rpc", "reset_prefix_cache", "empty_cache", "wake_up",
                     "reset_prefix_cache"]
    assert FakeLLM.calls[1] == ("wake_up", ("weights",)) and FakeLLM.calls[5] == ("wake_up", ("kv_cache",))
    # a wake from sleep without a sync in between: both wakes preceded by an empty cache
    engine.release()
    FakeLLM.calls.clear()
    engine.acquire()
    assert [c[0] for c in FakeLLM.calls] == ["empty_cache", "wake_up", "empty_cache", "wake_up",
                                             "reset_prefix_cache"]


def test_an_engine_without_sleep_mode_releases_nothing(fake_vllm, tmp_path):
    engine = make(tmp_path, sleep_mode=False)
    engine.release()
    engine.acquire()
    assert [c for c in FakeLLM.calls if c[0] in ("sleep", "wake_up", "empty_cache")] == []


@pytest.mark.parametrize("drop", ["enqueue", "logprobs_mode", "flat_logprobs", "reload"])
def test_a_vllm_without_what_the_engine_calls_is_refused_with_the_version_needed(fake_vllm, tiny_ckpt, tmp_path,
                                                                                 monkeypatch, drop):
    """engines.require and the engine refuse an old vLLM; so does every command that asks for it, before any work:
    exit 4, one line naming the version needed, nothing created."""
    from tests.conftest import one_error_line, run_main
    from tsopsd_cli.engines.vllm import VLLM_FLOOR

    fake_vllm["vllm"].__version__ = "0.16.0"
    if drop == "enqueue":
        fake_vllm["vllm"].LLM = type("OldLLM", (FakeLLM,), {"enqueue": None})
    elif drop == "logprobs_mode":
        fake_vllm["vllm.engine.arg_utils"].EngineArgs = dataclasses.make_dataclass("EngineArgs", [("dtype", str)])
    elif drop == "flat_logprobs":
        fake_vllm["vllm"].SamplingParams = type("SamplingParams", (), {"__struct_fields__": ("n",)})
    else:
        monkeypatch.setitem(sys.modules, "vllm.model_executor.model_loader.reload", None)  # import fails
    with pytest.raises(MissingDependencyError, match=rf"vllm>={VLLM_FLOOR} \(installed: 0\.16\.0") as e:
        engines.require("vllm")
    assert "\n" not in str(e.value) and e.value.exit_code == 4
    with pytest.raises(MissingDependencyError):
        make(tmp_path)
    assert FakeLLM.calls == []  # refused before any engine was built
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the commands run on this machine's CPU
    for args in (["eval", str(tiny_ckpt), "--engine", "vllm", "--out", str(tmp_path / "ev")],
                 ["rl", str(tiny_ckpt), "--out", str(tmp_path / "rl"), "--set", "rollout.engine=vllm"]):
        line = one_error_line(run_main(*args), code=4)
        assert f"needs vllm>={VLLM_FLOOR} (installed: 0.16.0" in line, line
    assert not (tmp_path / "ev").exists() and not (tmp_path / "rl").exists() and FakeLLM.calls == []


def test_the_installed_vllm_has_every_feature(fake_vllm):
    from tsopsd_cli.engines.vllm import missing_vllm_features

    assert missing_vllm_features() == []


def test_every_engine_implements_the_interface():
    """What docs/engines.md lists under "Adding an engine", on every registered engine class."""
    methods = [m for m in vars(engines.Engine) if not m.startswith("_") and callable(getattr(engines.Engine, m))]
    assert set(methods) >= {"generate", "with_batch_size", "sync_weights", "release", "acquire", "own_logprobs",
                            "close"}
    assert set(engines.names()) >= {"hf", "vllm"}
    for name in engines.names():
        cls = engines.engine_class(name)
        for m in [*methods, "check_installed", "from_recipe"]:
            assert callable(getattr(cls, m, None)), f"{name} lacks {m}"
        assert isinstance(cls.needs_model, bool) and isinstance(cls.samples_from_trainer_weights, bool)
    with pytest.raises(ValueError, match="unknown engine"):
        engines.engine_class("sglang")


def test_the_hf_engine_samples_from_the_trainer_s_weights_and_syncs_nothing(tiny_ckpt):
    from tsopsd_cli.checkpoint import load_checkpoint
    from tsopsd_cli.recipe_loading import build_recipe

    r = build_recipe("rl", None, {})
    ld = load_checkpoint(tiny_ckpt, r.model)
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *a):
            pass

    engine = engines.open_engine("hf", ld.tokenizer, model=ld.model, model_section=r.model, rollout=r.rollout,
                                 sample_context=Ctx)
    assert engine.batch_size == r.rollout.batch_size and engine.with_batch_size(3).batch_size == 3

    def never():
        raise AssertionError("the hf engine must not consume (gather) the trainer's tensors")
        yield

    assert engine.sync_weights(never()) is None
    comps = engine.with_batch_size(2).generate([[1, 2, 3]], engines.SamplingParams(num_generations=2,
                                                                                   max_new_tokens=3))
    assert len(comps) == 2 and entered == [1]  # the sampling context (FSDP gather, autocast) was entered
    assert engine.own_logprobs(comps) is None
    engine.release(), engine.acquire(), engine.close()


def test_the_weight_sync_guard_fires_after_consecutive_steps_above_the_dtype_s_limit(fake_vllm, tmp_path):
    from tsopsd_cli.engines.vllm import MAX_LOGPROB_DIFF
    from tsopsd_cli.errors import WeightSyncError

    engine = make(tmp_path)  # bfloat16 (the fake's dtype): default limit 0.1, 3 consecutive steps
    limit = MAX_LOGPROB_DIFF["bfloat16"]
    for step, diff in enumerate([0.5, 0.5, 0.01, None, 0.5, 0.5], 1):  # a good step resets the count; None skips
        engine.check_sync(diff, step)
    with pytest.raises(WeightSyncError, match=rf"0\.5 > {limit:g} \(bfloat16\) for 3 consecutive steps") as e:
        engine.check_sync(0.5, 7)
    assert e.value.exit_code == 5 and "\n" not in str(e.value)
    engine = make(tmp_path)
    engine.options = SimpleNamespace(**{**vars(OPTIONS), "max_logprob_diff": 1e-3, "max_logprob_diff_steps": 1})
    engine.check_sync(1e-3, 1)  # at the limit: fine
    with pytest.raises(WeightSyncError):
        engine.check_sync(float("nan"), 2)  # a non-finite mismatch counts as above
    engine.options = SimpleNamespace(**{**vars(OPTIONS), "max_logprob_diff_steps": 0})  # off
    for step in range(5):
        engine.check_sync(1e9, step)
