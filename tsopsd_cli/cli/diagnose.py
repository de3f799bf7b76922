"""`tsopsd diagnose CKPT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd_cli.errors import UsageError

from tsopsd_cli.cli.common import (emit, ChatOpt, TemplateOpt, prompt_flags, DeviceOpt, DtypeOpt, JsonOpt, OutOpt,
                                   OverwriteOpt, PickleOpt, QuietOpt, RecipeOpt, RemoteOpt, SetOpt, data_flags,
                                   model_flags, progress_for, resolve, stdout_console)
from tsopsd_cli.tasks.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK


def diagnose(
    checkpoint: Annotated[str, typer.Argument(help="Hugging Face checkpoint directory.")],
    texts: Annotated[Optional[Path], typer.Option(help="JSONL of {prompt, completion}: teacher-forced mode.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Reference checkpoint (same tokenizer).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Prompt source: 'toy' or a JSONL file (default: toy prompts "
                                                      "for a toy checkpoint, else MATH-500).")] = None,
    benchmark: Annotated[Optional[str], typer.Option("--benchmark", "-b", help="Sample on a named benchmark: "
                         f"{DEFAULT_BENCHMARK} (default on non-toy checkpoints), "
                         f"{', '.join(n for n in BENCHMARKS if n != DEFAULT_BENCHMARK)}.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Local benchmark copies (<name>.jsonl); without it the "
                                                          "benchmark comes from the hub (needs `datasets`).")] = None,
    num_prompts: Annotated[Optional[int], typer.Option(help="Sample on at most this many prompts of the source.")]
    = None,
    prompt_template: TemplateOpt = None, chat_template: ChatOpt = False,
    num_generations: Annotated[Optional[int], typer.Option(help="Completions per prompt.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest completion.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    engine: Annotated[Optional[str], typer.Option(help="Rollout engine of sampled mode: hf or vllm.")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(help="Tokens per vocabulary-projection chunk.")] = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    recipe: RecipeOpt = None, set_: SetOpt = None,
    out: OutOpt = None, overwrite: OverwriteOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> int:
    """Entropy, sharpness, temperature sensitivity and top-k statistics of a checkpoint.

    Sampled mode (default) measures the checkpoint on its own rollouts; --texts measures given pairs.
    --reference adds KL both ways, top-1 agreement, Jaccard@k and per-layer CKA/cosine.
    """
    flags = {
        "diagnose.texts": str(texts) if texts else None,
        "diagnose.reference": str(reference) if reference else None,
        "diagnose.chunk_size": chunk_size,
        "rollout.num_generations": num_generations, "rollout.temperature": temperature,
        "rollout.max_new_tokens": max_new_tokens, "rollout.seed": seed, "rollout.engine": engine,
        **model_flags(device, dtype, allow_pickle, trust_remote_code),
        "output.out": str(out) if out else None, "output.overwrite": overwrite,
    }
    if data is not None and (benchmark is not None or data_dir is not None):
        raise UsageError("give --data or --benchmark/--data-dir, not both")
    if benchmark == "toy" and data_dir is None:
        data, benchmark = "toy", None
    flags.update(data_flags(data))
    if benchmark is not None or data_dir is not None:
        flags.update({"data.type": "benchmark", "data.name": benchmark,
                      "data.data_dir": str(data_dir) if data_dir else None})
    flags["diagnose.num_prompts"] = num_prompts
    flags.update(prompt_flags("data", prompt_template, chat_template))
    rec = resolve("diagnose", recipe, set_, flags, checkpoint=checkpoint)
    from tsopsd_cli.runners.diagnose import run_diagnose

    report = run_diagnose(rec, checkpoint, progress_for(json_out, quiet))
    return emit(report, json_out, render)


def render(r: dict) -> None:
    from rich.table import Table

    con = stdout_console()
    t = Table(title=f"diagnose {r['checkpoint']} ({r['mode']}, {r['num_tokens']} completion tokens)",
              show_header=True, header_style="bold")
    t.add_column("statistic")
    t.add_column("value", justify="right")
    e = r["entropy"]
    t.add_row("entropy mean / median (nats)", f"{e['mean']:.4f} / {e['median']:.4f}")
    t.add_row("entropy q05 … q95", f"{e['quantiles']['q05']:.3f} … {e['quantiles']['q95']:.3f}")
    t.add_row(f"share of entropy in top {e['top_fraction']:.0%} tokens", f"{e['top_fraction_share']:.3f}")
    for thr, frac in e["above"].items():
        t.add_row(f"tokens with entropy > {thr}", f"{frac:.3f}")
    t.add_row("top-1 probability (mean)", f"{r['top1_prob']['mean']:.4f}")
    for k, v in r["topk_mass"].items():
        t.add_row(f"top-{k} mass (mean)", f"{v:.4f}")
    t.add_row("effective support exp(H) (mean)", f"{r['effective_support']['mean']:.3f}")
    dp = r.get("decision_points")
    if dp and dp["entropy"] is not None:
        t.add_row("entropy at decision points / elsewhere", f"{dp['entropy']:.4f} / {dp['other_entropy']:.4f}")
    for temp, v in r["temperature_entropy"].items():
        t.add_row(f"entropy at τ={temp}", f"{v:.4f}")
    ro = r.get("rollouts")
    if ro:
        t.add_row("distinct completions / answers per prompt",
                  f"{ro['distinct_completions']:.2f} / {ro['distinct_answers']:.2f} of {ro['num_generations']}")
        if "accuracy" in ro:
            t.add_row("accuracy (all samples)", f"{ro['accuracy']:.3f}")
        t.add_row("mean length / truncated", f"{ro['mean_length']:.1f} / {ro['truncation_rate']:.3f}")
    ref = r.get("reference")
    if ref:
        t.add_row("KL(ref ‖ ckpt) / KL(ckpt ‖ ref)", f"{ref['kl_forward']:.4f} / {ref['kl_reverse']:.4f}")
        t.add_row("top-1 agreement", f"{ref['top1_agreement']:.4f}")
        for k, v in ref["topk_jaccard"].items():
            t.add_row(f"Jaccard@{k}", f"{v:.4f}")
        if ref.get("cka"):
            t.add_row("CKA per layer (min / last)", f"{min(ref['cka']):.4f} / {ref['cka'][-1]:.4f}")
    con.print(t)
    if r.get("first_prompt") is not None:
        con.print(f"first prompt: {r['first_prompt']!r}", markup=False)
    if r.get("out"):
        con.print(f"report written to {r['out']}/report.json")
