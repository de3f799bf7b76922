"""`tsopsd reheat` through `main(argv)` in this process (several processes: through the real entry point)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import one_error_line, run_main

SMALL = ["--set", "data.num_prompts=64", "--set", "train.prompts_per_step=4", "--set", "rollout.num_generations=2",
         "--set", "rollout.max_new_tokens=16", "--set", "validation.limit=8", "--set", "validation.num_generations=2",
         "--set", "validation.max_new_tokens=16", "--set", "reheat.report_prompts=4",
         "--set", "train.micro_batch_size=8"]


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_fold_cli_writes_an_exactly_scaled_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "folded"
    p = run_main("reheat", str(tiny_ckpt), "--method", "fold", "--temp", "2.0", "--out", str(out), "--json")
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
    assert "already exists" in one_error_line(run_main("reheat", str(tiny_ckpt), "--method", "fold", "--out", str(out)))


def test_frozen_teacher_at_tau_one_gives_zero_loss_and_no_update(tiny_ckpt, tmp_path):
    out = tmp_path / "same"
    p = run_main("reheat", str(tiny_ckpt), "--temp", "1.0", "--max-steps", "1", "--out", str(out), *SMALL,
                 "--set", "validation.enabled=false", "--json")
    assert p.returncode == 0, p.stderr
    step = [m for m in metrics(out) if "loss" in m][0]
    assert step["loss"] == pytest.approx(0.0, abs=1e-6) and step["grad_norm"] == pytest.approx(0.0, abs=1e-5)
    assert step["top1_agreement"] == 1.0


@pytest.mark.slow
def test_ts_opsd_raises_entropy_and_keeps_top1(toy_base, tmp_path):
    out = tmp_path / "hot"
    # lr 3e-4: the toy world's entropy sits on one token per completion (the plan letter), so the per-step rollout
    # entropy of 16 completions is noisy; at 1e-4 six steps moved it less than that noise (measured: first step
    # 0.145, last three 0.147, 0.123, 0.139, while the report prompts went 0.111 -> 0.133)
    p = run_main("reheat", str(toy_base), "--temp", "1.6", "--max-steps", "6", "--lr", "3e-4", "--out", str(out),
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
    line = one_error_line(run_main("reheat", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--divergence", "l2"))
    assert "reheat.divergence" in line
    p = run_main("reheat", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--target-entropy", "1",
                 "--target-entropy-ratio", "0.5")
    assert p.returncode == 2 and "at most one of target_entropy and target_entropy_ratio" in p.stderr


def test_the_report_has_the_entropy_at_any_teacher_temperature(tiny_ckpt, tmp_path):
    """--temp 1.8 is not one of diagnose's default temperatures: the report used to say nan there."""
    out = tmp_path / "hot18"
    p = run_main("reheat", str(tiny_ckpt), "--temp", "1.8", "--max-steps", "1", "--out", str(out), *SMALL,
                 "--set", "validation.enabled=false", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    at = r["entropy_at_temp"]
    assert isinstance(at["before"], float) and isinstance(at["after"], float) and at["before"] > 0
    assert set(r["before"]["temperature_entropy"]) == {"1", "1.8"}
    assert at["before"] == r["before"]["temperature_entropy"]["1.8"] > r["before"]["entropy"]
    table = run_main("reheat", str(tiny_ckpt), "--temp", "1.8", "--max-steps", "1", "--out", str(tmp_path / "t"),
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
    p = run_main("reheat", str(ck), "--method", "fold", "--out", str(out), "--set", "model.dtype=float32")
    assert p.returncode == 0, p.stderr
    assert (out / "generation_config.json").read_text() == custom
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    p = run_main("reheat", str(ck), "--method", "fold", "--out", str(tmp_path / "f32"), "--set", "output.dtype=float32")
    assert p.returncode == 0 and json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


# ------------------------------------------------------------------------------- the report on a colocated engine
class SleepyEngine:
    """What colocated vLLM is on a GPU, as far as the report cares: a rollout engine with a sleep mode that holds its
    share of the accelerator while awake. It samples through the hf engine on the trained model (so its rollouts
    are the policy's) and records, in order, every sampling call (with its prompts) and every sleep."""

    name = "sleepy"
    samples_from_trainer_weights = False

    def __init__(self, run, events):
        from tsopsd_cli.engines.hf import HFEngine

        self.hf = HFEngine(run.model, run.tok, batch_size=64, lean=run.r.model.lean)
        self.tok = run.tok
        self.events = events
        self.asleep = False

    def generate(self, prompts, params, progress=None):
        self.asleep = False  # vLLM wakes up to sample
        self.events.append(("generate", [self.tok.decode(p) for p in prompts]))
        return self.hf.generate(prompts, params)

    def with_batch_size(self, batch_size):
        return self

    def release(self):  # vLLM's sleep
        self.asleep = True
        self.events.append(("sleep", None))

    def acquire(self):
        self.asleep = False

    def own_logprobs(self, comps):
        return [c.logprobs for c in comps]

    def check_sync(self, logprob_diff, step):
        pass

    def sync_weights(self, named):
        for _ in named:
            pass
        return 0.0

    def close(self):
        pass


def _reheat_with_sleepy_engine(tiny_ckpt, tmp_path, monkeypatch, *sets):
    from tsopsd_cli.parallel import sharding
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.reheat import ReheatRunner

    events, box = [], {}
    monkeypatch.setattr(ReheatRunner, "rollout_engine", lambda self: box.setdefault("e", SleepyEngine(self, events)))
    real = sharding.gathered

    def gathered(model):
        events.append(("gather", box["e"].asleep))
        return real(model)

    monkeypatch.setattr(sharding, "gathered", gathered)
    toy = [] if any(x.startswith("data.type=") for x in sets) else ["data.num_prompts=64"]  # a toy source's field
    r = build_recipe("reheat", None, parse_set_options([
        *toy, "train.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=8",
        "validation.limit=2", "validation.num_generations=1", "validation.max_new_tokens=8",
        "reheat.report_prompts=3", "train.max_steps=1", f"output.out={tmp_path / 'out'}", "output.plots=false",
        *sets]))
    return events, ReheatRunner(r, str(tiny_ckpt)).execute()


def test_the_report_puts_the_engine_to_sleep_before_gathering_whole_models(tiny_ckpt, tmp_path, monkeypatch):
    """Issue 21.3: the report gathered the policy and the teacher while vLLM was awake (after the final validation
    woke it): ~97 GiB per GPU at 8B. Every gather must now find the engine asleep, and the report's rollouts come
    from the run's engine (not an hf engine of the teacher on the main process alone)."""
    events, report = _reheat_with_sleepy_engine(tiny_ckpt, tmp_path, monkeypatch)
    gathers = [asleep for kind, asleep in events if kind == "gather"]
    assert len(gathers) >= 4  # before (policy + teacher) and after (policy + teacher)
    assert all(gathers), events
    first_gen = next(i for i, (k, _) in enumerate(events) if k == "generate")
    first_gather = next(i for i, (k, _) in enumerate(events) if k == "gather")
    assert first_gen < first_gather  # the report's rollouts were sampled by the run's engine, awake
    assert report["before"]["top1_agreement"] == 1.0 and report["after"]["entropy"] > 0


def test_the_report_samples_the_runs_own_prompts(tiny_ckpt, tmp_path, monkeypatch):
    """Issue 22.4: with validation off the report sampled toy benchmark prompts whatever the run's data; it must
    sample the first reheat.report_prompts prompts of the run's own prompt source."""
    data = tmp_path / "q.jsonl"
    qs = ["1+2=?", "3*4=?", "9-5=?", "7+7=?", "2*8=?"]
    data.write_text("".join(json.dumps({"problem": q, "answer": "0"}) + "\n" for q in qs))
    events, _ = _reheat_with_sleepy_engine(tiny_ckpt, tmp_path, monkeypatch, "validation.enabled=false",
                                           "data.type=jsonl", f"data.path={data}",
                                           'data.prompt_template="{question}"')
    first = next(prompts for kind, prompts in events if kind == "generate")
    assert first == qs[:3]


REPORT_RANK_SCRIPT = r'''
import json, os, sys, types
from tsopsd_cli.parallel import group
from tsopsd_cli.engines import Completion
from tsopsd_cli.runners.reheat import ReheatRunner, report_rollouts
from tsopsd_cli.tasks.base import Problem
from transformers import AutoTokenizer

class Counting:
    name = "vllm"
    can_sleep = False
    def __init__(self): self.seen = []
    def generate(self, prompts, params, progress=None):
        self.seen += [tok.decode(p) for p in prompts]
        return [Completion(i, j, list(p), [1 + params.row_seeds[i], 2 + j], "") for i, p in enumerate(prompts)
                for j in range(params.num_generations)]

tok = AutoTokenizer.from_pretrained(sys.argv[1])
run = object.__new__(ReheatRunner)
run.dist = group.Dist(1.0)
run.r = types.SimpleNamespace(reheat=types.SimpleNamespace(report_prompts=5),
                              validation=types.SimpleNamespace(max_new_tokens=4, stop=[]))
run.stream = types.SimpleNamespace(problems=[Problem(id=str(i), prompt=f"{i}+{i}=?", answer=None) for i in range(7)])
run.tok, run.engine = tok, Counting()
run.pl = types.SimpleNamespace(fsdp=True, autocast=lambda: __import__("contextlib").nullcontext())
seqs = report_rollouts(run)
json.dump({"seen": run.engine.seen, "seqs": seqs}, open(sys.argv[2] + f"/rank{run.dist.rank}.json", "w"))
run.dist.close()
'''


@pytest.mark.slow
def test_the_reports_rollouts_are_spread_over_the_processes(tiny_ckpt, tmp_path):
    """Issue 21.3: rank 0 generated the report's rollouts alone (64 x up to 8,192 tokens at 8B) while the other
    ranks waited under the collective timeout. With 2 gloo ranks each samples its share (every other prompt) and
    both receive all of them, in prompt order."""
    import sys

    from tests.conftest import launch_ranks

    script = tmp_path / "ranks.py"
    script.write_text(REPORT_RANK_SCRIPT)
    for p in launch_ranks(2, str(tiny_ckpt), str(tmp_path), command=[sys.executable, str(script)], timeout=120):
        assert p.returncode == 0, p.stderr[-2000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2))
    assert r0["seen"] == ["0+0=?", "2+2=?", "4+4=?"] and r1["seen"] == ["1+1=?", "3+3=?"]
    assert r0["seqs"] == r1["seqs"]
    assert [t for _, t in r0["seqs"]] == [[1 + i, 2 + j] for i in range(5) for j in range(2)]
