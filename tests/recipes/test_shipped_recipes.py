"""Every shipped recipe runs through the CLI (`main(argv)`, in this process) for a couple of steps on a tiny model.
Recipes that differ only in their comments run once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_main
from tsopsd_cli.recipe_loading import build_recipe

ROOT = Path(__file__).resolve().parents[2]
# recipes/demo/toy.yaml runs, its stages shrunk, in tests/cli/test_demo.py (a whole pipeline per run)
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "demo")


def _content(path: Path) -> tuple[str, dict]:
    kind = path.parent.name
    return kind, build_recipe("toy-init" if kind == "toy" else kind, path).model_dump(mode="json")


def _same_content(paths: list[Path]) -> list[list[Path]]:
    """`paths` grouped by what they parse to (e.g. recipes/eval/qwen3-8b-base.yaml is qwen3-4b-base.yaml with
    another model name in its comments): a smoke run of the first of a group covers every file in it."""
    groups: list[list[Path]] = []
    for path in paths:
        group = next((g for g in groups if _content(g[0]) == _content(path)), None)
        if group is None:
            groups.append([path])
        else:
            group.append(path)
    return groups


RECIPE_GROUPS = _same_content(RECIPES)

# Overrides that shrink a recipe to a smoke run; the recipe's own structure (data source, sections) is kept.
SHRINK = {
    "diagnose": ["--set", "data.num_prompts=2", "--set", "rollout.num_generations=2",
                 "--set", "rollout.max_new_tokens=8", "--set", "model.dtype=float32", "--set", "model.device=cpu"],
    "rl": ["--max-steps", "2", "--set", "data.num_prompts=16", "--prompts-per-step", "4", "--num-generations", "2",
           "--max-new-tokens", "8", "--set", "validation.limit=4", "--set", "model.device=cpu",
           "--set", "grpo.mini_batches=2"],
    "reheat": ["--max-steps", "2", "--set", "data.num_prompts=16", "--set", "train.prompts_per_step=2",
               "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=8", "--set", "validation.limit=4",
               "--set", "reheat.report_prompts=2", "--set", "model.device=cpu"],
    "toy": ["--steps", "2", "--set", "train.eval_problems=4", "--set", "train.batch_size=4"],
    "eval": ["--limit", "2", "-n", "2", "--max-new-tokens", "8", "--set", "eval.toy_num_problems=2",
             "--set", "model.device=cpu"],
}


# Real-model recipes read hub data sets and ask for bf16/vLLM: for the smoke run on a tiny model they keep their
# structure but take toy prompts, float32 and the hf engine (no network or GPU here).
OFFLINE = {
    "diagnose": ["--set", "data.type=toy", "--set", "data.num_prompts=2"],
    "eval": ["--benchmark", "toy", "--engine", "hf", "--set", "rollout.vllm.max_model_len=null"],
    "rl": ["--set", "data.type=toy", "--set", "data.split=train", "--set", "validation.benchmarks=[toy]",
           "--set", "grpo.dynamic_sampling=false", "--set", "rollout.engine=hf"],
    "reheat": ["--set", "data.type=toy", "--set", "data.split=train", "--set", "validation.benchmarks=[toy]",
               "--set", "reheat.target_entropy_ratio=null", "--set", "rollout.engine=hf"],
}


@pytest.mark.parametrize("group", RECIPE_GROUPS,
                         ids=lambda g: "+".join(str(p.relative_to(ROOT / "recipes")) for p in g))
def test_recipe_runs_for_a_couple_of_steps(group, tiny_ckpt, tmp_path):
    recipe = group[0]
    kind = recipe.parent.name
    out = tmp_path / "out"
    extra = [*OFFLINE[kind], "--set", "model.dtype=float32"] if recipe.stem.startswith("qwen") else []
    if kind == "diagnose":
        p = run_main("diagnose", str(tiny_ckpt), "--recipe", str(recipe), *extra, *SHRINK[kind], "--out", str(out),
                     "--json")
    elif kind == "rl":
        p = run_main("rl", str(tiny_ckpt), "--recipe", str(recipe), *extra, *SHRINK[kind], "--out", str(out), "--json")
    elif kind == "reheat":
        p = run_main("reheat", str(tiny_ckpt), "--recipe", str(recipe), *extra, *SHRINK[kind], "--out", str(out),
                     "--json")
    elif kind == "eval":
        p = run_main("eval", str(tiny_ckpt), "--recipe", str(recipe), *extra, *SHRINK[kind], "--out", str(out),
                     "--json")
    elif kind == "toy":
        p = run_main("toy", "init", "--recipe", str(recipe), *SHRINK[kind], "--out", str(out), "--json")
    else:
        pytest.fail(f"no smoke run defined for recipes/{kind}/")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert out.is_dir()
    if kind in ("rl", "reheat"):
        assert report["command"] == kind and report["out"] == str(out)
        assert report["steps"] == 2 or (kind == "reheat" and report["stop_reason"] != "max_steps")
        assert (out / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
        assert report["recipe"]["train"]["strategy"] == build_recipe(kind, recipe).train.strategy  # recipe kept
    elif kind == "toy":
        assert report["checkpoint"] == str(out) and (out / "config.json").is_file()
    else:
        assert report["command"] == kind and (out / "report.json").is_file()
        if kind == "eval":
            assert report["macro"]["accuracy"] >= 0 and report["benchmarks"]["toy"]["problems"] == 2


def test_the_demo_recipe_is_the_demo_command_default():
    from tsopsd_cli.recipe import DemoRecipe
    from tsopsd_cli.recipe_loading import build_recipe

    assert build_recipe("demo", ROOT / "recipes" / "demo" / "toy.yaml") == DemoRecipe()
