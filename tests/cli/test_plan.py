"""`tsopsd plan` through `main(argv)` (pure arithmetic, no process boundary to test): table, --json, bad input, a
config.json path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import one_error_line, run_main

ROOT = Path(__file__).resolve().parents[2]
RL_4B = str(ROOT / "recipes/rl/qwen3-4b-base.yaml")
RL_8B = str(ROOT / "recipes/rl/qwen3-8b-base.yaml")
QWEN3_4B_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560,
                   "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "intermediate_size": 9728, "vocab_size": 151936, "tie_word_embeddings": True,
                   "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}


def plan_json(*args: str) -> dict:
    p = run_main("plan", *args, "--json")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_table_names_every_item_and_the_answer():
    p = run_main("plan", RL_4B, "--gpus", "8", "--gpu-memory", "80")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "qwen3-4b" in out and "fsdp" in out  # the model from the file name, the recipe's strategy
    for row in ("weights (master, float32)", "gradients", "optimiser state", "gathered parameters", "activations",
                "KV cache", "peak per phase", "training (fwd+bwd)", "assumptions ("):
        assert row in out, row
    assert "fits: yes" in out


def test_json_is_one_object_with_fits():
    d = plan_json(RL_8B, "--gpus", "8")
    assert d["fits"] is True and d["strategy"] == "fsdp" and d["gpus"] == 8
    assert d["model"]["name"] == "qwen3-8b" and d["model"]["params"] == 8_190_735_360
    w = d["per_gpu"]["weights"]
    assert w["bytes"] == -(-8_190_735_360 * 4 // 8) and w["gib"] == pytest.approx(w["bytes"] / 2**30, abs=1e-3)
    assert set(d["phases"]) >= {"rollout", "training"} and d["assumptions"]["values"]["prompt_tokens"] == 1024


def test_one_gpu_does_not_fit_and_still_exits_0():
    d = plan_json(RL_8B, "--gpus", "1")
    assert d["fits"] is False and d["strategy"] == "single"
    p = run_main("plan", RL_8B, "--gpus", "1")
    assert p.returncode == 0 and "fits: NO" in p.stdout


def test_options_move_the_figures():
    hf = ["--set", "rollout.engine=hf", "--set", "rollout.batch_size=16"]  # the hf engine's KV cache line
    base = plan_json(RL_4B, "--gpus", "8", *hf)
    longer = plan_json(RL_4B, "--gpus", "8", *hf, "--prompt-tokens", "4096", "--set", "train.micro_batch_size=1")
    assert longer["assumptions"]["values"]["prompt_tokens"] == 4096
    assert longer["per_gpu"]["rollout_kv_cache"]["bytes"] > base["per_gpu"]["rollout_kv_cache"]["bytes"]
    vllm = plan_json(RL_4B, "--gpus", "8")  # the shipped recipe: vLLM's share instead
    assert "rollout_kv_cache" not in vllm["per_gpu"] and vllm["vllm"]["kv_tokens"] > 9216
    assert plan_json(RL_4B, "--gpus", "8", "--gpu-memory", "20")["fits"] is False


def test_bad_input_exits_2_with_one_line(tmp_path):
    assert "not found" in one_error_line(run_main("plan", str(tmp_path / "nope.yaml")))
    line = one_error_line(run_main("plan", str(ROOT / "recipes/diagnose/qwen3-4b-base.yaml")))
    assert "plan covers training recipes" in line
    assert "not a built-in shape" in one_error_line(run_main("plan", RL_4B, "--model", "gpt-9"))
    line = one_error_line(run_main("plan", str(ROOT / "recipes/rl/toy.yaml")))
    assert "--model" in line  # no model name in the file name
    assert "gpus" in one_error_line(run_main("plan", RL_4B, "--gpus", "0"))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert "JSON" in one_error_line(run_main("plan", RL_4B, "--model", str(bad)))
    bad.write_text(json.dumps({"hidden_size": 8}))
    assert "lacks" in one_error_line(run_main("plan", RL_4B, "--model", str(bad)))
    line = one_error_line(run_main("plan", RL_4B, "--set", "train.micro_batch_size=0"))
    assert "micro_batch_size" in line
    line = one_error_line(run_main("plan", str(ROOT / "recipes/reheat/qwen3-4b-base.yaml"),
                                   "--set", "reheat.method=fold"))
    assert "fold" in line


def test_a_config_json_path_or_checkpoint_directory(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(QWEN3_4B_CONFIG))
    by_name = plan_json(RL_4B, "--gpus", "8")
    for model in (ckpt, ckpt / "config.json"):
        d = plan_json(str(ROOT / "recipes/rl/toy.yaml"), "--model", str(model), "--gpus", "8")
        assert d["model"]["params"] == by_name["model"]["params"] == 4_022_468_096
        assert d["model"]["name"] == str(model)
    assert plan_json(RL_4B, "--model", "Qwen/Qwen3-4B-Base")["model"]["name"] == "qwen3-4b"
    assert "no config.json" in one_error_line(run_main("plan", RL_4B, "--model", str(tmp_path)))


@pytest.mark.parametrize("recipe", ["rl/qwen3-4b-base", "rl/qwen3-8b-base", "reheat/qwen3-4b-base",
                                    "reheat/qwen3-8b-base"])
def test_every_shipped_qwen3_recipe_fits_8x80_with_every_phase(recipe):
    """Issue 21.5: the honest plan (load, weight sync, report rollouts with vLLM awake, the report with it asleep,
    PyTorch's carried cache, vLLM's profiled share) still says the shipped recipes fit one node of 8 x 80 GB."""
    r = plan_json(str(ROOT / f"recipes/{recipe}.yaml"), "--gpus", "8", "--gpu-memory", "80")
    want = {"load", "rollout", "validation", "training", "optimizer_step", "weight_sync"}
    if recipe.startswith("reheat"):
        want |= {"report_rollout", "report"}
    assert set(r["phases"]) == want and r["fits"] is True
    assert r["vllm"]["max_num_batched_tokens"] == 9216 and r["vllm"]["max_num_seqs"] == 64
    assert "torch_cache" in r["per_gpu"] and "sync_tensor" in r["per_gpu"]


def test_a_cpu_run(tmp_path):
    r = plan_json(RL_4B, "--model", "qwen3-0.6b", "--device", "cpu", "--gpus", "2", "--gpu-memory", "24",
                  "--set", "rollout.engine=hf", "--set", "validation.enabled=false", "--set", "model.dtype=auto")
    assert r["device"] == "cpu" and "validation" not in r["phases"] and "weight_sync" not in r["phases"]
    assert r["per_gpu"]["weights"]["bytes"] == 596_049_920 * 4 // 2  # float32 master, 2 fsdp shards
    assert "overhead" not in r["assumptions"] and r["assumptions"]["values"]["cpu_runtime_gib"] == 0.6
    assert "--device" in one_error_line(run_main("plan", RL_4B, "--device", "tpu"))
