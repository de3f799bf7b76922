"""`tsopsd demo`: the paper's experiment in miniature on the toy world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd_cli.cli.common import (JsonOpt, OverwriteOpt, QuietOpt, RecipeOpt, SetOpt, print_json, progress_for,
                                   resolve, stdout_console)

EPILOG = ("[bold]Example:[/bold] tsopsd demo --out runs/demo   (then open runs/demo/summary.md; "
          "more seeds: --seeds 0,1,2)")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every stage's output and the summary.",
                                      rich_help_panel="Output")] = Path("runs/demo"),
    temp: Annotated[Optional[float], typer.Option("--temp", help="Teacher temperature of TS-OPSD and fold, "
                                                  "and the rollout temperature of the rollout-temperature arm "
                                                  "(default 1.6).")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds of the continued-RL arms "
                                                 "(default 0).")] = None,
    full: Annotated[bool, typer.Option("--full", help="The long demo: recipes/demo/full.yaml (5 seeds, 100 "
                                       "continued-RL steps per arm; about 22 minutes on 2 cores).")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard an unfinished demo of --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Keep finished stages of an earlier demo in --out and "
                                         "continue where it stopped.")] = False,
    recipe: RecipeOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> int:
    """Toy base -> RL until entropy collapse -> diagnose -> reheat (TS-OPSD and fold) -> continued RL from each
    starting point -> eval; writes summary.md, summary.json and plots."""
    seed_list = None
    if seeds is not None:
        try:
            seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            from tsopsd_cli.errors import UsageError

            raise UsageError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
    if full:
        if recipe is not None:
            from tsopsd_cli.errors import UsageError

            raise UsageError("--full is recipes/demo/full.yaml: give either --full or --recipe")
        from tsopsd_cli.recipe import RECIPES_DIR

        recipe = RECIPES_DIR / "demo" / "full.yaml"
    rec = resolve("demo", recipe, set_, {"output.out": str(out), "output.overwrite": overwrite,
                                         "demo.temp": temp, "demo.seeds": seed_list})
    from tsopsd_cli.runners.demo import run_demo

    summary = run_demo(rec, progress_for(json_out, quiet), resume=resume, restart=restart)
    if json_out:
        print_json({k: v for k, v in summary.items()})
        return 0
    con = stdout_console()
    c = summary["collapse"]
    con.print(f"collapse: entropy {c['entropy_base']:.3f} -> {c['entropy_collapsed']:.3f} nats "
              f"({c['entropy_ratio']:.1f}x), accuracy {c['accuracy_base']:.3f} -> {c['accuracy_collapsed']:.3f}")
    from rich.table import Table

    t = Table(title=f"tsopsd demo (temp {summary['temp']:g}, seeds {summary['seeds']})")
    for col in ("arm", "start entropy", f"top-{summary['topk']} Jaccard", "CKA", "acc before", "acc after",
                "pass@k after", "decision entropy start → end"):
        t.add_column(col, justify="left" if col == "arm" else "right")
    pm = lambda m, sd: "—" if m is None else f"{m:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")  # noqa: E731
    f4 = lambda x: "—" if x is None else f"{x:.4f}"  # noqa: E731
    for name, a in summary["arms"].items():
        t.add_row(name, f"{a['entropy']:.3f}", f"{a['topk_jaccard']:.3f}", f"{a['cka_last_layer']:.3f}",
                  f"{a['accuracy_before']:.3f}", pm(a["accuracy_after"], a["accuracy_after_std"]),
                  pm(a["pass@k_after"], a.get("pass@k_after_std")),
                  f"{f4(a['decision_entropy_start'])} → {f4(a['decision_entropy_end'])}")
    con.print(t)
    con.print(f"summary: {Path(summary['out']) / 'summary.md'} ({summary['seconds']:.0f} s)")
    return 0
