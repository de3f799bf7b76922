"""`tsopsd demo`: the study's claim tested in miniature on the toy world (docs/demo.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd_cli.cli.common import (JsonOpt, OverwriteOpt, QuietOpt, RecipeOpt, SetOpt, print_json, progress_for,
                                   resolve, stdout_console)

EPILOG = ("[bold]Example:[/bold] tsopsd demo --out runs/demo   (one seed: a smoke of the design; the verdict needs "
          "tsopsd demo --full)")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every stage's output and the summary.",
                                      rich_help_panel="Output")] = Path("runs/demo"),
    temp: Annotated[Optional[float], typer.Option("--temp", help="Use this temperature for rollout-temperature, "
                                                  "fold and TS-OPSD instead of choosing one of demo.temps by the "
                                                  "calibration rule.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds (default 0; --full: 0-9).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Runs side by side, one thread each "
                                                   "(default: one per core).")] = None,
    full: Annotated[bool, typer.Option("--full", help="The study: recipes/demo/full.yaml (ten paired seeds, "
                                       "calibration of every arm's setting; about an hour on 2 cores).")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard an unfinished demo of --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Keep finished stages of an earlier demo in --out and "
                                         "continue where it stopped.")] = False,
    recipe: RecipeOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> int:
    """The study in miniature on the toy world: base -> RL until entropy collapse -> calibration of every arm's
    setting on training problems -> per seed, TS-OPSD's reheat and continued RL from every arm's start (and the
    base control) -> paired statistics and a verdict computed from them; writes summary.md, summary.json and a
    plot (docs/demo.md)."""
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
                                         "demo.temps": [temp] if temp is not None else None,
                                         "demo.seeds": seed_list, "demo.workers": workers})
    from tsopsd_cli.runners.demo import run_demo

    summary = run_demo(rec, progress_for(json_out, quiet), resume=resume, restart=restart)
    if json_out:
        print_json(summary)
        return 0
    render(summary)
    return 0


def render(s: dict) -> None:
    from rich.table import Table

    con = stdout_console()
    n = len(s["design"]["seeds"])
    con.print(f"verdict: {s['verdict']} ({s['verdict_reason']})")
    ctl = s["controls"]
    con.print(f"controls: escaped from the base in {sum(ctl['base']['escaped_per_seed'])}/{n} seeds, from the "
              f"collapsed checkpoint in {sum(ctl['collapsed']['escaped_per_seed'])}/{n}")
    t = Table(title=f"tsopsd demo ({n} seed{'s' if n > 1 else ''}, budget {s['design']['budget_steps']} steps)")
    for col in ("arm", "primary", "escaped", "rollouts", "ts-opsd - arm", "p (Holm)", "p (TOST)"):
        t.add_column(col, justify="left" if col == "arm" else "right")
    rows = {c["vs"]: c for c in s["comparisons"]}
    for name, a in s["arms"].items():
        xs = a["primary_per_seed"]
        c = rows.get(name)
        t.add_row(name, f"{sum(xs) / len(xs):.3f}", f"{sum(a['escaped_per_seed'])}/{n}",
                  f"{sum(a['rollouts']) / len(a['rollouts']):,.0f}",
                  "—" if c is None else f"{c['diff_mean']:+.4f}", "—" if c is None else f"{c['p_holm']:.3f}",
                  "—" if c is None else f"{c['p_tost']:.3f}")
    con.print(t)
    con.print(f"summary: {Path(s['out']) / 'summary.md'} ({s['seconds']:.0f} s)")
