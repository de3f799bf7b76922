"""`tsopsd eval CKPT` and `tsopsd eval grade FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd_cli.cli.common import (emit, DeviceOpt, DtypeOpt, JsonOpt, OutOpt, OverwriteOpt, PickleOpt, QuietOpt,
                                   RecipeOpt, RemoteOpt, SetOpt, model_flags, print_json, progress_for, resolve,
                                   stdout_console)
from tsopsd_cli.tasks.benchmarks import DEFAULT_BENCHMARK, NAMES

EVAL_EPILOG = ("[bold]Example:[/bold] tsopsd eval ./ckpt --benchmark aime24,math500 -n 16 --temperature 0.6 "
               "--out eval/   (re-grade: tsopsd eval grade samples.jsonl)")


def evaluate(
    checkpoint: Annotated[str, typer.Argument(help="Hugging Face checkpoint directory.")],
    benchmark: Annotated[Optional[list[str]], typer.Option("--benchmark", "-b", help=f"{', '.join(NAMES)} "
                         "(repeatable or comma-separated). Default: toy on a toy checkpoint, else "
                         f"{DEFAULT_BENCHMARK}.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="A custom JSONL/parquet set.")] = None,
    question_field: Annotated[Optional[str], typer.Option(help="Question field of --data.")] = None,
    answer_field: Annotated[Optional[str], typer.Option(help="Answer field of --data.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Local benchmark copies (<name>.jsonl).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="First N problems of each benchmark.")] = None,
    num_generations: Annotated[Optional[int], typer.Option("--num-generations", "-n",
                                                           help="Samples per problem (avg@n).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass (1 = off).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest completion.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    engine: Annotated[Optional[str], typer.Option(help="hf or vllm.")] = None,
    prompt_template: Annotated[Optional[str], typer.Option(help="boxed, qa-boxed, plain or a format string.")] = None,
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Use the tokenizer's chat template.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard an unfinished eval of --out.")] = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False, recipe: RecipeOpt = None, set_: SetOpt = None,
    out: OutOpt = None, overwrite: OverwriteOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> int:
    """Evaluate a checkpoint on math benchmarks: avg@n, pass@k, maj@n, length, truncation, token entropy.

    With --out, an interrupted eval resumes where it stopped when run again (same recipe and checkpoint).
    """
    from tsopsd_cli.tasks.benchmarks import parse_names

    flags = {
        "eval.benchmarks": parse_names(benchmark) if benchmark else ([] if data else None),
        "eval.data": str(data) if data else None, "eval.question_field": question_field,
        "eval.answer_field": answer_field, "eval.data_dir": str(data_dir) if data_dir else None,
        "eval.limit": limit, "eval.prompt_template": prompt_template, "eval.chat_template": chat_template,
        "rollout.num_generations": num_generations, "rollout.temperature": temperature, "rollout.top_p": top_p,
        "rollout.max_new_tokens": max_new_tokens, "rollout.seed": seed, "rollout.engine": engine,
        **model_flags(device, dtype, allow_pickle, trust_remote_code),
        "output.out": str(out) if out else None, "output.overwrite": overwrite,
    }
    rec = resolve("eval", recipe, set_, flags, checkpoint=checkpoint)
    from tsopsd_cli.runners.evaluate import run_eval

    report = run_eval(rec, checkpoint, progress_for(json_out, quiet), restart=restart)
    return emit(report, json_out, render)


def render(r: dict) -> None:
    from rich.table import Table

    n = r["num_generations"]
    con = stdout_console()
    t = Table(title=f"eval {r['checkpoint']} (n={n}, T={r['temperature']}, engine {r['engine']})",
              header_style="bold")
    ks = list(next(iter(r["benchmarks"].values()))["pass@k"])
    for col in ["benchmark", "problems", f"avg@{n}", *[f"pass@{k}" for k in ks], f"maj@{n}", "length",
                "truncated", "entropy"]:
        t.add_column(col, justify="left" if col == "benchmark" else "right")

    def row(name, b, problems):
        ent = b.get("mean_token_entropy")
        t.add_row(name, str(problems), f"{b[f'avg@{n}']:.3f}", *[f"{b['pass@k'][k]:.3f}" for k in ks],
                  f"{b[f'maj@{n}']:.3f}", f"{b['mean_length']:.1f}", f"{b['truncation_rate']:.3f}",
                  "-" if ent is None else f"{ent:.3f}")

    for name, b in r["benchmarks"].items():
        row(name, b, b["problems"])
    if len(r["benchmarks"]) > 1:
        row("macro average", r["macro"], sum(b["problems"] for b in r["benchmarks"].values()))
    con.print(t)
    if r.get("out"):
        con.print(f"report and samples written to {r['out']}")


def grade(
    file: Annotated[Path, typer.Argument(help="JSONL with fields 'completion' and 'answer'.")],
    workers: Annotated[int, typer.Option(help="Grading processes.")] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds per answer.")] = 5.0,
    out: OutOpt = None, overwrite: OverwriteOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> int:
    """Re-grade existing completions: last boxed answer (or ####, Answer:) against the gold, via math-verify."""
    from tsopsd_cli.runners.evaluate import regrade

    result = regrade(file, out, overwrite, workers, timeout, progress_for(json_out, quiet))
    if json_out:
        print_json(result)
    else:
        stdout_console().print(f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['n']}), "
                               f"{result['timeouts']} timed out")
    return 0
