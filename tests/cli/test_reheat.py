"""`tsopsd reheat` through the real entry point."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.test_cli import one_error_line
from tests.conftest import run_cli

SMALL = ["--set", "data.num_prompts=64", "--set", "train.prompts_per_step=4", "--set", "rollout.num_generations=2",
         "--set", "rollout.max_new_tokens=16", "--set", "validation.limit=8", "--set", "validation.num_generations=2",
         "--set", "validation.max_new_tokens=16", "--set", "reheat.report_prompts=4",
         "--set", "train.micro_batch_size=8"]


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_fold_cli_writes_an_exactly_scaled_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "folded"
    p = run_cli("reheat", str(tiny_ckpt), "--method", "fold", "--temp", "2.0", "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["method"] == "fold" and r["max_logit_error"] < 1e-4
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits / 2.0, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "tsopsd.json").read_text())["metrics"]["method"] == "fold"
    assert "already exists" in one_error_line(run_cli("reheat", str(tiny_ckpt), "--method", "fold", "--out", str(out)))


def test_frozen_teacher_at_tau_one_gives_zero_loss_and_no_update(tiny_ckpt, tmp_path):
    out = tmp_path / "same"
    p = run_cli("reheat", str(tiny_ckpt), "--temp", "1.0", "--max-steps", "1", "--out", str(out), *SMALL,
                "--set", "validation.enabled=false", "--json")
    assert p.returncode == 0, p.stderr
    step = [m for m in metrics(out) if "loss" in m][0]
    assert step["loss"] == pytest.approx(0.0, abs=1e-6) and step["grad_norm"] == pytest.approx(0.0, abs=1e-5)
    assert step["top1_agreement"] == 1.0


def test_ts_opsd_raises_entropy_and_keeps_top1(toy_base, tmp_path):
    out = tmp_path / "hot"
    # lr 3e-4: the toy world's entropy sits on one token per completion (the plan letter), so the per-step rollout
    # entropy of 16 completions is noisy; at 1e-4 six steps moved it less than that noise (measured: first step
    # 0.145, last three 0.147, 0.123, 0.139, while the report prompts went 0.111 -> 0.133)
    p = run_cli("reheat", str(toy_base), "--temp", "1.6", "--max-steps", "6", "--lr", "3e-4", "--out", str(out),
                *SMALL, "--set", "train.prompts_per_step=8", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    steps = [m for m in metrics(out) if "loss" in m]
    assert sum(s["student_entropy"] for s in steps[-3:]) / 3 > steps[0]["student_entropy"]
    assert all(s["teacher_entropy"] > s["student_entropy"] for s in steps[:1])
    assert r["after"]["entropy"] > r["before"]["entropy"]
    # the >= 90 % target is for the toy recipe's model (measured 0.97); this smaller test model has flatter
    # distributions whose near-ties flip more easily
    assert r["after"]["top1_agreement"] >= 0.85 and len(r["after"]["cka"]) == 3
    assert r["before"]["top1_agreement"] == 1.0 and r["before"]["kl_forward"] == pytest.approx(0.0, abs=1e-6)
    assert {"curves.png", "report.json", "model.safetensors"} <= {f.name for f in out.iterdir()}


def test_reheat_recipe_errors(tiny_ckpt, tmp_path):
    line = one_error_line(run_cli("reheat", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--divergence", "l2"))
    assert "reheat.divergence" in line
    p = run_cli("reheat", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--target-entropy", "1",
                "--target-entropy-ratio", "0.5")
    assert p.returncode == 2 and "at most one of target_entropy and target_entropy_ratio" in p.stderr


def test_the_report_has_the_entropy_at_any_teacher_temperature(tiny_ckpt, tmp_path):
    """--temp 1.8 is not one of diagnose's default temperatures: the report used to say nan there."""
    out = tmp_path / "hot18"
    p = run_cli("reheat", str(tiny_ckpt), "--temp", "1.8", "--max-steps", "1", "--out", str(out), *SMALL,
                "--set", "validation.enabled=false", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    at = r["entropy_at_temp"]
    assert isinstance(at["before"], float) and isinstance(at["after"], float) and at["before"] > 0
    assert set(r["before"]["temperature_entropy"]) == {"1", "1.8"}
    assert at["before"] == r["before"]["temperature_entropy"]["1.8"] > r["before"]["entropy"]
    table = run_cli("reheat", str(tiny_ckpt), "--temp", "1.8", "--max-steps", "1", "--out", str(tmp_path / "t"),
                    *SMALL, "--set", "validation.enabled=false")
    assert table.returncode == 0 and "nan" not in table.stdout


def test_outputs_keep_the_input_generation_config_and_dtype(tiny_ckpt, tmp_path):
    """The input's generation_config.json (its eos ids, sampling defaults) is the user's: outputs keep it byte for
    byte, and `output.dtype: auto` keeps the input's dtype."""
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    custom = '{"eos_token_id": [1, 2], "pad_token_id": 0, "temperature": 0.7, "top_p": 0.95, "do_sample": true}\n'
    (ck / "generation_config.json").write_text(custom)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (ck / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "fold"
    p = run_cli("reheat", str(ck), "--method", "fold", "--out", str(out), "--set", "model.dtype=float32")
    assert p.returncode == 0, p.stderr
    assert (out / "generation_config.json").read_text() == custom
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    p = run_cli("reheat", str(ck), "--method", "fold", "--out", str(tmp_path / "f32"), "--set", "output.dtype=float32")
    assert p.returncode == 0 and json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
