"""Lists that must agree are derived from their registry: every help text and recipe description that names the
benchmarks names exactly tasks.benchmarks' registry, the divergence choices are core.divergences' list, which
core.chunked dispatches on, the recipe's prompt-source tags are the tasks' source registry and its engine help names
exactly the engines registry."""

from __future__ import annotations

import re
from typing import get_args, get_type_hints

import pytest
import torch

from tsopsd_cli.cli.diagnose import diagnose
from tsopsd_cli.cli.evaluate import evaluate
from tsopsd_cli.cli.reheat import reheat
from tsopsd_cli.core.chunked import divergence_from_logits
from tsopsd_cli.core.divergences import DIVERGENCES
from tsopsd_cli import engines, tasks
from tsopsd_cli.recipe import BenchmarkData, DataSection, DistillSection, EvalSection, ReheatSection, RolloutSection
from tsopsd_cli.tasks.benchmarks import BENCHMARKS, NAMES


def option_help(command, name: str) -> str:
    hint = get_type_hints(command, include_extras=True)[name]
    return next(m.help for m in hint.__metadata__ if hasattr(m, "help"))


def named(text: str, candidates) -> list[str]:
    """The candidates a text names, as whole words ('non-toy' does not name 'toy')."""
    words = re.findall(r"[\w-]+", text)
    return sorted({w for w in words if w in candidates})


def benchmark_like(text: str) -> set[str]:
    """Words that look like a benchmark's name (a digit or an underscore: aime24, minerva_math), and known names."""
    return {w for w in re.findall(r"[\w-]+", text) if w in NAMES or re.search(r"\d|_", w)}


@pytest.mark.parametrize("text, names", [
    (BenchmarkData.model_fields["name"].description, list(BENCHMARKS)),
    (EvalSection.model_fields["benchmarks"].description, NAMES),
    (option_help(evaluate, "benchmark"), NAMES),
    (option_help(diagnose, "benchmark"), list(BENCHMARKS)),
], ids=["recipe data.name", "recipe eval.benchmarks", "eval --benchmark", "diagnose --benchmark"])
def test_benchmark_lists_name_exactly_the_registry(text, names):
    assert named(text, NAMES) == sorted(names)
    assert benchmark_like(text) == set(names)


def test_divergence_choices_are_the_one_list():
    assert get_args(DistillSection.model_fields["divergence"].annotation) == DIVERGENCES
    assert named(option_help(reheat, "divergence"), DIVERGENCES) == sorted(DIVERGENCES)
    assert named(DistillSection.model_fields["divergence"].description, DIVERGENCES) == sorted(DIVERGENCES)
    for field in ("method", "teacher"):
        assert named(option_help(reheat, field), get_args(ReheatSection.model_fields[field].annotation)) == \
            sorted(get_args(ReheatSection.model_fields[field].annotation))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_core_dispatches_every_divergence(kind):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    d = divergence_from_logits(s, t, kind)
    assert d.shape == (3,) and bool(torch.isfinite(d).all()) and bool((d > 0).all())


def test_prompt_sources_are_the_recipe_data_tags():
    union = get_args(DataSection)[0]  # Annotated[Union[ToyData, ...], Field(discriminator="type")]
    tags = [tag for member in get_args(union) for tag in get_args(member.model_fields["type"].annotation)]
    assert tags == tasks.source_types()


def test_engine_help_names_exactly_the_registry():
    # the description stays written out (the schema's bytes are pinned); this holds it to engines.register
    assert named(RolloutSection.model_fields["engine"].description, engines.names()) == sorted(engines.names())
