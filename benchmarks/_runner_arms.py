"""The arms of benchmarks/gpu_check.py that run tsopsd's own runners on random-weight Qwen3 checkpoints with the
real tokenizer: `plan` (rl and reheat per phase beside `tsopsd plan`, with each step's time split), `rollout` (the
hf engine's decode step inside the reheat runner against the bare engine) and `cli` (the user's torchrun command).
Each takes the device ("cuda", or "cpu" under --smoke) and a work folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the Qwen3 configurations the runs use (random weights; 4b only when asked for)
SHAPES = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=6144),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=9728),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128),
}
PLAN_SHAPES = {"0.6b": "qwen3-0.6b", "1.7b": "qwen3-1.7b", "4b": "qwen3-4b", "tiny": None}


def _checkpoint(work: Path, shape: str) -> Path:
    from tests.qwen_ckpt import make_qwen_checkpoint

    ckpt = work / f"ckpt-{shape}"
    if not ckpt.exists():
        make_qwen_checkpoint(ckpt, dtype="bfloat16", tie_word_embeddings=True, **SHAPES[shape])
    return ckpt


def _prompts(work: Path, n: int = 16) -> Path:
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Compute {i} times {i + 3}, then add {2 * i}.",
                                        "answer": str(i * (i + 3) + 2 * i)}) + "\n" for i in range(n)))
    return data


def _one_process_group(dev: str, port: int) -> None:
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        torch.distributed.init_process_group("nccl" if dev == "cuda" else "gloo", rank=0, world_size=1)


@contextlib.contextmanager
def _patched(*patches):
    """(owner, attr, replacement) set for the duration (None: left as it is, for a caller that wraps it inside);
    every attribute as it was after."""
    saved = [(owner, attr, owner.__dict__.get(attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, fn in patches:
            if fn is not None:
                setattr(owner, attr, fn)
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            if fn is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, fn)


# ------------------------------------------------------------------------------------------------ plan arm
def plan_arm(shape: str, command: str, work: Path, dev: str, tokens: int) -> dict:
    """One real `rl` or `reheat` run (fsdp on one process, hf engine, 2 steps of 4 prompts x 2 x `tokens`),
    measured per phase (the allocator's peak and seconds) beside `plan`, with each step's time split."""
    from benchmarks._phases import PhaseMeter, Split, training_patches
    from tsopsd_cli.core.memory import GiB, SHAPES as PLAN_SHAPE_TABLE, Assumptions, plan, shape_from_config
    from tsopsd_cli.parallel import sharding
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.reheat import ReheatRunner
    from tsopsd_cli.runners.rl import RLRunner

    ckpt, data = _checkpoint(work, shape), _prompts(work)
    sets = ["data.type=jsonl", f"data.path={data}", "train.prompts_per_step=4", "rollout.num_generations=2",
            f"rollout.max_new_tokens={tokens}", "validation.enabled=false", "train.max_steps=2",
            "train.micro_batch_size=4", "train.gradient_checkpointing=true", "train.strategy=fsdp",
            "train.save_every=0", "optim.lr=1e-6", f"output.out={work / f'out-{shape}-{command}'}",
            "output.overwrite=true", "output.plots=false", "model.dtype=" + ("bfloat16" if dev == "cuda" else "auto"),
            f"model.device={dev}"]
    sets += (["grpo.reward=tests.rewards:even_length"] if command == "rl" else
             ["reheat.report_prompts=4", f"validation.max_new_tokens={tokens}"])
    recipe = build_recipe(command, None, parse_set_options(sets))
    _one_process_group(dev, 29534)
    cuda = dev == "cuda"
    meter = PhaseMeter(torch.cuda.reset_peak_memory_stats if cuda else (lambda: None),
                       torch.cuda.max_memory_allocated if cuda else (lambda: 0),
                       torch.cuda.synchronize if cuda else (lambda: None))
    real_placement = sharding.placement

    def fsdp_placement(m, t, dist):  # one process, but sharded as fsdp would be (a one-process group)
        pl = real_placement(m, t, dist)
        return sharding.Placement(strategy="fsdp", device=pl.device, master_dtype=pl.master_dtype,
                                  compute_dtype=pl.compute_dtype, frozen_sharded=pl.frozen_sharded, world=1)

    patches = training_patches(command)
    run = (RLRunner if command == "rl" else ReheatRunner)(recipe, str(ckpt))
    split = Split()
    with _patched((sharding, "placement", fsdp_placement), *((o, a, None) for o, a, _ in patches)):
        for owner, attr, name in patches:
            meter.wrap(owner, attr, name)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        split.instrument(run)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                run.execute()
        finally:
            split.restore()
    pshape = PLAN_SHAPE_TABLE[PLAN_SHAPES[shape]] if PLAN_SHAPES[shape] else shape_from_config(
        json.loads((ckpt / "config.json").read_text()), "tiny")
    prompt_len = max(len(x) for x in _encoded(ckpt, data))
    p = plan(recipe, pshape, gpus=1, assumptions=Assumptions(prompt_tokens=prompt_len), device=dev, strategy="fsdp")
    items_sum = {ph: sum(i.bytes for i in p.items if ph in i.phases) for ph in p.phases}
    rows = {}
    for ph in ("load", "rollout", "training", "optimizer_step", "report_rollout", "report", "save"):
        if ph not in meter.peak:
            continue
        measured = meter.peak[ph] - base
        predicted = items_sum.get(ph)
        rows[ph] = {"measured_GiB": round(measured / GiB, 3), "seconds": round(meter.seconds[ph], 2),
                    "plan_items_GiB": None if predicted is None else round(predicted / GiB, 3),
                    "plan_peak_GiB": None if predicted is None else round(p.phases[ph] / GiB, 3),
                    "ratio": None if predicted is None or not measured else round(predicted / measured, 3)}
    return {"shape": shape, "command": command, "params": pshape.params, "prompt_tokens": prompt_len,
            "completion_tokens": tokens, "phases": rows,
            "split_per_step": {k: round(v / recipe.train.max_steps, 3) for k, v in split.seconds.items()}}


def _encoded(ckpt: Path, data: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return [tok(json.loads(x)["problem"])["input_ids"] for x in data.read_text().splitlines()]


def run_plan_arm(shapes: list[str], dev: str, tokens: int, until: float | None = None) -> list[dict]:
    """plan_arm for rl and reheat at each shape, printed as a table and the time split; no run is started after
    time.perf_counter() passes `until`."""
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as d:
        for shape in shapes:
            for command in ("rl", "reheat"):
                t0 = time.perf_counter()
                if until is not None and t0 > until:
                    print(f"\n== plan vs {command} at the {shape} shape: skipped (--deadline)", flush=True)
                    continue
                r = plan_arm(shape, command, Path(d), dev, tokens)
                r["wall_seconds"] = round(time.perf_counter() - t0, 1)
                out.append(r)
                print(f"\n== plan vs {command} at the {shape} shape ({r['params'] / 1e9:.2f} B params; fsdp, 1 "
                      f"process, hf engine; prompts {r['prompt_tokens']} + {r['completion_tokens']} tokens), "
                      f"{r['wall_seconds']} s", flush=True)
                print(f"{'phase':16s}{'measured GiB':>14s}{'plan items':>12s}{'plan/meas':>11s}{'seconds':>9s}")
                for ph, row in r["phases"].items():
                    plan_s = "-" if row["plan_items_GiB"] is None else f"{row['plan_items_GiB']:.3f}"
                    ratio_s = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
                    print(f"{ph:16s}{row['measured_GiB']:14.3f}{plan_s:>12s}{ratio_s:>11s}{row['seconds']:9.2f}")
                print(f"{command} time split (s per step, mean of 2): " + ", ".join(
                    f"{k} {v:.3f}" for k, v in sorted(r["split_per_step"].items(), key=lambda kv: -kv[1])))
                if dev == "cuda":
                    torch.cuda.empty_cache()
            shutil.rmtree(Path(d) / f"ckpt-{shape}", ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------- rollout arm
def rollout_arm(shape: str, work: Path, dev: str, tokens: int) -> dict:
    """The hf engine's time per decoding step inside the reheat runner (one process: float32 master weights, bf16
    compute, so the rollout decodes from its bf16 copy) against the bare engine on a bf16 model of the same
    weights, the same prompts and settings; each timed on its second call (the runner's second step)."""
    from transformers import AutoModelForCausalLM

    from tsopsd_cli.engines.hf import HFEngine
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.reheat import ReheatRunner

    ckpt, data = _checkpoint(work, shape), _prompts(work)
    recipe = build_recipe("reheat", None, parse_set_options([
        "data.type=jsonl", f"data.path={data}", "train.prompts_per_step=8", "rollout.num_generations=4",
        f"rollout.max_new_tokens={tokens}", "rollout.batch_size=32", "validation.enabled=false",
        "train.max_steps=2", "train.micro_batch_size=8", "train.gradient_checkpointing=true", "train.save_every=0",
        "reheat.report_prompts=1", "validation.max_new_tokens=4", "reheat.target_entropy_ratio=null",
        f"output.out={work / f'out-rollout-{shape}'}", "output.overwrite=true", "output.plots=false",
        "model.dtype=bfloat16", f"model.device={dev}"]))
    calls = []
    real = HFEngine.generate

    def timed_generate(self, prompts, params, progress=None, ignore_eos=False):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        comps = real(self, prompts, params, progress, ignore_eos)
        if dev == "cuda":
            torch.cuda.synchronize()
        calls.append((time.perf_counter() - t0, prompts, params, comps))
        return comps

    with _patched((HFEngine, "generate", timed_generate)), contextlib.redirect_stdout(sys.stderr):
        ReheatRunner(recipe, str(ckpt)).execute()
    steps = [c for c in calls if c[2].max_new_tokens == tokens and c[2].num_generations == 4]
    seconds, prompts, params, comps = steps[-1]  # the second step's rollout
    runner_step = seconds / max(len(c.token_ids) for c in comps)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(dev)
    bare = HFEngine(model, _tokenizer(ckpt), batch_size=32, dtype=torch.bfloat16)
    for _ in range(2):  # timed on the second call, as the runner's
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = bare.generate(prompts, params)
        if dev == "cuda":
            torch.cuda.synchronize()
        bare_seconds = time.perf_counter() - t0
    bare_step = bare_seconds / max(len(c.token_ids) for c in got)
    return {"shape": shape, "rows": len(comps), "max_new_tokens": tokens, "runner_seconds": round(seconds, 3),
            "runner_ms_per_step": round(1e3 * runner_step, 2), "bare_seconds": round(bare_seconds, 3),
            "bare_ms_per_step": round(1e3 * bare_step, 2), "rollout_in_runner": round(runner_step / bare_step, 3)}


def _tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


# ------------------------------------------------------------------------------------------------- cli arm
def cli_arm(shape: str, work: Path, tokens: int, timeout: int) -> dict:
    """The user's command, `torchrun --nproc_per_node 1 -m tsopsd_cli reheat CKPT --recipe
    recipes/reheat/qwen3-4b-base.yaml` with the hf engine, 8 prompts x 4 x `tokens` tokens, 2 steps and the
    report, run through benchmarks/phased_cli.py (the same entry, plus a timer per phase): its exit code, wall
    time, per-phase seconds and each step's rollout/training seconds (metrics.jsonl)."""
    ckpt, data = _checkpoint(work, shape), _prompts(work)
    out = work / "cli-out"
    launcher = ["torchrun"] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    args = ["reheat", str(ckpt), "--recipe", str(ROOT / "recipes" / "reheat" / "qwen3-4b-base.yaml"),
            "--out", str(out), "--overwrite", "--data", str(data), "--max-steps", "2",
            "--set", "rollout.engine=hf", "--set", "train.prompts_per_step=8", "--set", "rollout.num_generations=4",
            "--set", f"rollout.max_new_tokens={tokens}", "--set", "validation.enabled=false",
            "--set", "reheat.report_prompts=8", "--set", f"validation.max_new_tokens={tokens}",
            "--set", "reheat.target_entropy_ratio=null"]  # (random weights start at the target: 2 steps all the same)
    phases = work / "phases.json"
    cmd = [*launcher, "--nproc_per_node", "1", str(ROOT / "benchmarks" / "phased_cli.py"), *args]
    user = " ".join([*launcher, "--nproc_per_node", "1", "-m", "tsopsd_cli", *args])
    env = {**os.environ, "PHASES_JSON": str(phases), "PYTHONPATH": os.pathsep.join(
        x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        code, tail = proc.returncode, proc.stderr[-2000:]
    except subprocess.TimeoutExpired as e:  # (its captured output comes as bytes or str, or None)
        err = e.stderr or b""
        code, tail = None, (err.decode(errors="replace") if isinstance(err, bytes) else err)[-2000:]
    wall = time.perf_counter() - t0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    return {"command": user, "exit_code": code, "wall_seconds": round(wall, 1),
            "phases": json.loads(phases.read_text()) if phases.is_file() else None,
            "steps": [{k: round(r[k], 2) for k in ("step", "rollout_seconds", "train_seconds", "step_seconds")
                       if k in r} for r in steps if "step_seconds" in r],
            "stderr_tail": tail if code != 0 else ""}
