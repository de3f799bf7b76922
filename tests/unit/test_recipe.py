from __future__ import annotations

from pathlib import Path

import pytest

from tsopsd_cli.errors import RecipeError
from tsopsd_cli.recipe import RECIPES
from tsopsd_cli.recipe_loading import build_recipe, defaults_yaml, parse_set_options, validate_file

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


@pytest.mark.parametrize("command", ["rl", "reheat", "eval"])
def test_naming_one_field_keeps_the_commands_own_section_defaults(command, tmp_path):
    """rl/reheat train on the toy *train* split with their own rollout sizes; an override of one field of such a
    section (on the command line or in a file) must not fall back to the bare section's defaults (the test split,
    4 completions of 64 tokens) for the others."""
    base = build_recipe(command)
    data = command != "eval"  # eval has no data section
    for tree_file, sets in ((None, ["rollout.top_p=0.9", *(["data.num_prompts=64"] if data else [])]),
                            ("rollout:\n  top_p: 0.9\n" + ("data:\n  num_prompts: 64\n" if data else ""), [])):
        f = None
        if tree_file:
            f = tmp_path / "r.yaml"
            f.write_text(tree_file)
        r = build_recipe(command, f, parse_set_options(sets))
        assert r.rollout.top_p == 0.9
        assert (r.rollout.num_generations, r.rollout.max_new_tokens) == (base.rollout.num_generations,
                                                                         base.rollout.max_new_tokens)
        if data:
            assert r.data.split == "train" and r.data.num_prompts == 64
    if data:
        assert build_recipe(command, None, parse_set_options(["data.type=toy"])).data == base.data
        jsonl = build_recipe(command, None, parse_set_options(["data.type=jsonl", "data.path=x.jsonl"]))
        assert jsonl.data.type == "jsonl"  # another source: the toy fields do not carry over


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


@pytest.mark.parametrize("command,body,field,says", [
    ("rl", "grpo:\n  top_entropy_quantile: 0\n", "grpo.top_entropy_quantile", "greater than 0"),
    ("rl", "grpo:\n  top_entropy_quantile: 1.5\n", "grpo.top_entropy_quantile", "less than or equal to 1"),
    ("rl", "grpo:\n  entropy_coef_step: -0.01\n", "grpo.entropy_coef_step", "greater than or equal to 0"),
    ("rl", "grpo:\n  entropy_coef_max: -1\n", "grpo.entropy_coef_max", "greater than or equal to 0"),
    ("rl", "grpo:\n  entropy_target: 0.5\n  entropy_coef: 2.0\n", "grpo", "must lie in [0, entropy_coef_max"),
    ("reheat", "reheat:\n  teacher_ema_decay: 1.0\n", "reheat.teacher_ema_decay", "less than 1"),
    ("reheat", "reheat:\n  teacher_ema_decay: 0\n", "reheat.teacher_ema_decay", "greater than 0"),
    ("rl", "thermostat:\n  teacher_ema_decay: 1.5\n", "thermostat.teacher_ema_decay", "less than 1"),
    ("reheat", "reheat:\n  method: fold\n  teacher: ema\n", "reheat", "method fold takes none"),
])
def test_out_of_range_remedy_settings_are_refused_with_one_line(command, body, field, says, tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(f"command: {command}\n{body}")
    lines = validate_file(f)
    assert len(lines) == 1 and lines[0].startswith(f"{f}: {field}: ") and says in lines[0], lines


def test_the_remedies_are_ordinary_recipe_fields():
    r = build_recipe("rl", None, parse_set_options([
        "grpo.top_entropy_quantile=0.2", "grpo.entropy_target=0.3", "grpo.entropy_coef_step=0.01",
        "grpo.entropy_coef_max=0.1", "thermostat.teacher=ema", "thermostat.teacher_ema_decay=0.9"]))
    assert (r.grpo.top_entropy_quantile, r.grpo.entropy_target, r.thermostat.teacher) == (0.2, 0.3, "ema")
    h = build_recipe("reheat", None, parse_set_options(["reheat.teacher=ema", "reheat.teacher_ema_decay=0.99"]))
    assert (h.reheat.teacher, h.reheat.teacher_ema_decay) == ("ema", 0.99)
    g = build_recipe("rl").grpo  # the defaults are today's behaviour: every token, a fixed coefficient
    assert g.top_entropy_quantile == 1.0 and g.entropy_target is None


# ------------------------------------------------------------------------------ the third fault round (#31)
@pytest.mark.parametrize("text,first,second", [
    ("optim:\n  lr: 1.0e-3\ntrain:\n  seed: 1\noptim:\n  eps: 1.0\n", 1, 5),  # a section twice
    ("optim:\n  lr: 1.0e-3\n  eps: 1.0\n  lr: 2.0e-3\n", 2, 4),  # a field twice
])
def test_a_duplicated_key_in_a_recipe_file_is_refused_with_both_lines(text, first, second, tmp_path):
    """The last one silently won, and `recipe validate` said ok."""
    f = tmp_path / "rl.yaml"
    f.write_text("command: rl\n" + text)
    with pytest.raises(RecipeError) as e:
        build_recipe("rl", f)
    line = e.value.lines[0]
    assert "duplicate key" in line and f"line {first + 1}" in line and f"line {second + 1}" in line, line
    problems = validate_file(f)
    assert len(problems) == 1 and "duplicate key" in problems[0]


def test_a_duplicated_key_in_a_set_value_is_refused():
    with pytest.raises(RecipeError, match="duplicate key"):
        parse_set_options(["diagnose.topk={a: 1, a: 2}"])


def test_a_set_value_for_a_text_field_is_taken_as_written():
    """`--set eval.prompt_template={question}` was read by YAML as a mapping ("Input should be a valid string")
    where `--prompt-template '{question}'` takes the same text."""
    r = build_recipe("eval", None, parse_set_options(["eval.prompt_template={question}"]))
    assert r.eval.prompt_template == "{question}"
    r = build_recipe("rl", None, parse_set_options(["data.type=jsonl", "data.path=x.jsonl",
                                                    "data.prompt_template=[{question}]"]))
    assert r.data.prompt_template == "[{question}]"
    r = build_recipe("rl", None, parse_set_options(["validation.data_dir=null", "rollout.temperature=0.5"]))
    assert r.validation.data_dir is None and r.rollout.temperature == 0.5  # other values are YAML as before


def test_a_data_field_set_before_the_data_type_is_kept():
    """`--set data.question_field=question --set data.type=jsonl` dropped the field given first."""
    for sets in (["data.question_field=question", "data.type=jsonl", "data.path=x.jsonl"],
                 ["data.type=jsonl", "data.path=x.jsonl", "data.question_field=question"]):
        r = build_recipe("rl", None, parse_set_options(sets))
        assert r.data.type == "jsonl" and r.data.question_field == "question", sets


def test_grpo_with_one_generation_per_prompt_is_refused():
    """One completion per prompt: every group's advantage is 0 (torch warned `std(): degrees of freedom is <= 0`)
    and the run trained nothing."""
    with pytest.raises(RecipeError) as e:
        build_recipe("rl", None, parse_set_options(["rollout.num_generations=1"]))
    assert len(e.value.lines) == 1 and "rollout.num_generations" in e.value.lines[0] and "at least 2" in \
        e.value.lines[0]
    assert build_recipe("rl", None, parse_set_options(["validation.num_generations=1"]))  # validation may sample 1
