from __future__ import annotations

from pathlib import Path

import pytest

from tsopsd_cli.errors import RecipeError
from tsopsd_cli.recipe import (RECIPES, build_recipe, defaults_yaml, parse_set_options, validate_file)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_build_for_every_command():
    for command in RECIPES:
        assert build_recipe(command).command == command
        assert defaults_yaml(command).startswith("command:")


def test_file_then_overrides_win(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("rollout:\n  temperature: 1.3\n  num_generations: 2\n")
    r = build_recipe("diagnose", f, parse_set_options(["rollout.temperature=0.7", "diagnose.topk=[1, 3]"]))
    assert r.rollout.temperature == 0.7 and r.rollout.num_generations == 2 and r.diagnose.topk == [1, 3]


def test_errors_are_one_line_per_problem_with_field_paths(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("rollout:\n  temperature: -1\n  bogus: 3\nmodel:\n  device: tpu\n")
    with pytest.raises(RecipeError) as e:
        build_recipe("diagnose", f)
    lines = e.value.lines
    assert len(lines) == 3
    assert any(line.endswith("rollout.temperature: Input should be greater than 0") for line in lines)
    assert any("rollout.bogus: unknown field" in line for line in lines)
    assert any("model.device: Value error, must be auto" in line for line in lines)
    assert all(line.startswith(f"{f}: ") for line in lines)


def test_data_source_switch_and_discriminated_errors():
    r = build_recipe("diagnose", None, parse_set_options(["data.type=jsonl", "data.path=x.jsonl"]))
    assert r.data.type == "jsonl" and str(r.data.path) == "x.jsonl"
    with pytest.raises(RecipeError) as e:
        build_recipe("diagnose", None, parse_set_options(["data.num_prompts=0"]))
    assert e.value.lines == ["data.num_prompts: Input should be greater than or equal to 1"]


def test_cross_field_rule_has_a_sentence():
    with pytest.raises(RecipeError) as e:
        build_recipe("toy-init", None, parse_set_options(["model.hidden_size=30", "model.num_heads=4"]))
    assert "hidden_size (30) must be divisible by num_heads (4)" in e.value.lines[0]


def test_bad_yaml_and_wrong_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        build_recipe("diagnose", bad)
    other = tmp_path / "other.yaml"
    other.write_text("command: toy-init\n")
    with pytest.raises(RecipeError, match="for 'toy-init', not 'diagnose'"):
        build_recipe("diagnose", other)
    with pytest.raises(RecipeError, match="expected section.field=value"):
        parse_set_options(["novalue"])


def test_every_shipped_recipe_validates():
    files = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert files, "recipes/ is empty"
    for f in files:
        assert validate_file(f) == [], f
