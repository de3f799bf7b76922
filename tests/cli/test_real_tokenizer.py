"""Every command on checkpoints with the real Qwen3 tokenizer (151,936-row vocabulary, byte-level BPE, special
tokens, chat template), through `main(argv)` in this process: base-like and instruct-like end tokens, tied and untied,
Qwen3, Qwen2 and Llama, a vocabulary padded to 152,064 rows. Small shapes (hidden 64, 2 layers) and a few tokens
per completion keep each run to seconds; what is measured here is that nothing breaks and that the toy world's
defaults are not applied to a real model, not accuracy (the weights are random)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import one_error_line, run_cli, run_main

ROOT = Path(__file__).resolve().parents[2]
BRACES = "{question} Put your final answer in \\boxed{}. Not {answer}, not {0}."
TINY = ["--num-generations", "2", "--max-new-tokens", "3"]


def ok(res) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    return json.loads(res.stdout)


# ------------------------------------------------------------------------------------------- diagnose (case 1)
def test_diagnose_samples_math500_by_default_on_a_real_checkpoint(qwen3_base, benchmark_dir):
    r = ok(run_main("diagnose", str(qwen3_base), "--data-dir", str(benchmark_dir), "--num-prompts", "2", *TINY,
                    "--json"))
    assert r["mode"] == "sampled"
    assert r["recipe"]["data"]["type"] == "benchmark" and r["recipe"]["data"]["name"] == "math500"
    assert r["rollouts"]["num_prompts"] == 2 and r["num_tokens"] > 0
    # the boxed prompt, rendered as written, and no toy decision points on a real tokenizer
    assert r["first_prompt"].endswith("put your final answer within \\boxed{}.")
    assert "decision_points" not in r


def test_diagnose_default_recipe_on_a_real_checkpoint():
    from tsopsd_cli.recipe_loading import REAL_MAX_NEW_TOKENS, build_recipe

    real = build_recipe("diagnose", None, [], world="real")
    assert real.data.type == "benchmark" and real.data.name == "math500" and real.data.prompt_template == "boxed"
    assert not real.data.chat_template and real.rollout.max_new_tokens == REAL_MAX_NEW_TOKENS
    toy = build_recipe("diagnose", None, [], world="toy")
    assert toy.data.type == "toy" and toy.rollout.max_new_tokens == 64
    # a flag the user gave wins
    assert build_recipe("diagnose", None, [("rollout.max_new_tokens", 7)], world="real").rollout.max_new_tokens == 7


@pytest.mark.slow
def test_diagnose_offline_without_a_local_copy_says_what_to_pass(qwen3_base, tmp_path):
    # a process of its own: huggingface_hub reads HF_HUB_OFFLINE when it is imported
    res = run_cli("diagnose", str(qwen3_base), *TINY, "--json", env={"HF_DATASETS_OFFLINE": "1",
                                                                     "HF_HUB_OFFLINE": "1"})
    line = one_error_line(res)
    assert "--data-dir" in line


def test_diagnose_benchmark_option(qwen3_base, benchmark_dir):
    r = ok(run_main("diagnose", str(qwen3_base), "-b", "gsm8k", "--data-dir", str(benchmark_dir),
                    "--num-prompts", "1", *TINY, "--json", "-q"))
    assert r["recipe"]["data"]["name"] == "gsm8k" and r["rollouts"]["num_prompts"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_instruct", "qwen3_untied", "qwen2_ckpt", "llama_ckpt"])
def test_diagnose_sampled_on_every_family(name, request, math_jsonl):
    ckpt = request.getfixturevalue(name)
    r = ok(run_main("diagnose", str(ckpt), "--data", str(math_jsonl), "--num-prompts", "2", *TINY, "--json", "-q"))
    assert r["rollouts"]["num_prompts"] == 2 and r["num_tokens"] > 0


def test_diagnose_texts_on_a_real_checkpoint(qwen3_base, tmp_path):
    texts = tmp_path / "pairs.jsonl"
    texts.write_text(json.dumps({"prompt": "What is 2+3? Put it in \\boxed{}.", "completion": " \\boxed{5}<|im_end|>"})
                     + "\n")
    r = ok(run_main("diagnose", str(qwen3_base), "--texts", str(texts), "--json", "-q"))
    assert r["mode"] == "texts" and r["num_tokens"] > 3


def test_diagnose_toy_checkpoint_keeps_toy_defaults(tiny_ckpt):
    r = ok(run_main("diagnose", str(tiny_ckpt), "--num-prompts", "3", *TINY, "--json", "-q"))
    assert r["recipe"]["data"]["type"] == "toy" and r["rollouts"]["num_prompts"] == 3
    assert "decision_points" in r


# --------------------------------------------------------------------------------------------- case 6
def test_diagnose_num_prompts_limits_a_jsonl_source(qwen3_base, math_jsonl):
    r = ok(run_main("diagnose", str(qwen3_base), "--data", str(math_jsonl), "--num-prompts", "2", *TINY,
                    "--json", "-q"))
    assert r["rollouts"]["num_prompts"] == 2


def test_diagnose_reference_with_a_padded_vocabulary(qwen3_base, qwen3_padded, math_jsonl):
    r = ok(run_main("diagnose", str(qwen3_base), "--reference", str(qwen3_padded), "--data", str(math_jsonl),
                    "--num-prompts", "2", *TINY, "--json"))
    rows = r["reference"]["vocab_rows"]
    assert rows["checkpoint"] == 151_936 and rows["reference"] == 152_064 and rows["compared"] == 151_936
    assert r["reference"]["kl_forward"] >= 0 and len(r["reference"]["cka"]) == 2


@pytest.mark.slow
def test_diagnose_padded_checkpoint_against_a_smaller_reference(qwen3_padded, qwen3_base, tmp_path):
    texts = tmp_path / "pairs.jsonl"
    texts.write_text(json.dumps({"prompt": "1+1=", "completion": " 2, so \\boxed{2}"}) + "\n")
    r = ok(run_main("diagnose", str(qwen3_padded), "--reference", str(qwen3_base), "--texts", str(texts),
                    "--json", "-q"))
    assert r["reference"]["vocab_rows"]["compared"] == 151_936


def test_clip_to_rows_cuts_at_a_row_the_other_head_lacks():
    from tsopsd_cli.analysis import clip_to_rows

    kept, dropped = clip_to_rows([([1], [5, 9, 3]), ([1], [12, 2]), ([1], [4])], rows=8)
    assert kept == [([1], [5]), ([1], [4])] and dropped == 4


def test_distinct_answers_does_not_count_no_answer():
    from tsopsd_cli.runners.diagnose import distinct_answers

    assert distinct_answers([["no idea", "still no idea"]]) == 0
    assert distinct_answers([["\\boxed{3}", "rambling", "\\boxed{3}"], ["\\boxed{1}", "\\boxed{2}", "x"]]) == 1.5


# --------------------------------------------------------------------------------------------- case 3
def test_a_template_with_other_braces_renders_as_written(benchmark_dir):
    from tsopsd_cli.tasks.benchmarks import load_benchmark, template_text

    p = load_benchmark("math500", benchmark_dir, template_text(BRACES), limit=1)[0]
    q = p.meta["question"]
    assert p.prompt == f"{q} Put your final answer in \\boxed{{}}. Not {{answer}}, not {{0}}."


def test_jsonl_source_renders_braces_as_written(math_jsonl):
    from tsopsd_cli.recipe import JsonlData
    from tsopsd_cli.tasks import load_problems

    p = load_problems(JsonlData(path=math_jsonl, prompt_template=BRACES))[0]
    assert p.prompt.endswith(" Put your final answer in \\boxed{}. Not {answer}, not {0}.")


@pytest.mark.parametrize("template", ["boxed", pytest.param("qa-boxed", marks=pytest.mark.slow),
                                      pytest.param("plain", marks=pytest.mark.slow), BRACES])
def test_eval_with_each_template(template, qwen3_base, benchmark_dir):
    from tsopsd_cli.tasks.benchmarks import PROMPT_TEMPLATES

    r = ok(run_main("eval", str(qwen3_base), "-b", "math500", "--data-dir", str(benchmark_dir), "--limit", "1",
                    "-n", "1", "--max-new-tokens", "3", "--prompt-template", template, "--json", "-q"))
    first = r["first_prompts"]["math500"]
    tail = PROMPT_TEMPLATES.get(template, template).split("{question}")[-1]
    assert first.endswith(tail) and "{question}" not in first


def test_eval_chat_template_on_an_instruct_checkpoint(qwen3_instruct, benchmark_dir):
    r = ok(run_main("eval", str(qwen3_instruct), "-b", "math500", "--data-dir", str(benchmark_dir), "--limit", "1",
                    "-n", "1", "--max-new-tokens", "3", "--chat-template", "--json", "-q"))
    first = r["first_prompts"]["math500"]
    assert first.startswith("<|im_start|>user\n") and first.endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------- cases 4, 5
def test_rl_on_a_real_checkpoint_without_data_refuses(qwen3_base, tmp_path):
    line = one_error_line(run_main("rl", str(qwen3_base), "--out", str(tmp_path / "rl")))
    assert "--data" in line and "toy" in line
    assert not (tmp_path / "rl").exists()


def test_reheat_on_a_real_checkpoint_without_data_refuses(qwen3_base, tmp_path):
    line = one_error_line(run_main("reheat", str(qwen3_base), "--out", str(tmp_path / "hot")))
    assert "--data" in line


def test_recipe_template_survives_data(tmp_path):
    from tsopsd_cli.recipe_loading import build_recipe

    rec = tmp_path / "r.yaml"
    rec.write_text("command: rl\ndata:\n  type: hub\n  name: some/set\n  prompt_template: qa-boxed\n"
                   "  chat_template: true\n  question_field: prompt\n")
    r = build_recipe("rl", rec, [("data.type", "jsonl"), ("data.path", "x.jsonl")])
    assert r.data.type == "jsonl" and r.data.prompt_template == "qa-boxed" and r.data.chat_template
    assert r.data.question_field == "problem"  # where to read is the new source's


def test_shipped_recipe_keeps_boxed_with_data(tmp_path):
    from tsopsd_cli.recipe_loading import build_recipe

    r = build_recipe("rl", ROOT / "recipes/rl/qwen3-4b-base.yaml", [("data.type", "jsonl"), ("data.path", "x.jsonl"),
                                                                     ("data.prompt_template", "qa-boxed")])
    assert r.data.prompt_template == "qa-boxed"
    r = build_recipe("rl", ROOT / "recipes/rl/qwen3-4b-base.yaml", [("data.type", "jsonl"), ("data.path", "x.jsonl")])
    assert r.data.prompt_template == "boxed"


def test_every_source_defaults_to_evals_template():
    from tsopsd_cli.recipe import EvalSection, HubData, JsonlData, ValidationSection

    want = EvalSection().prompt_template
    assert JsonlData(path="x.jsonl").prompt_template == want
    assert HubData(name="a/b").prompt_template == want
    assert ValidationSection().prompt_template == want


def test_validation_follows_the_run_data(math_jsonl):
    from tsopsd_cli.recipe_loading import build_recipe
    from tsopsd_cli.tasks import validation_sets
    from tests.qwen_ckpt import qwen_tokenizer

    r = build_recipe("rl", None, [("data.type", "jsonl"), ("data.path", str(math_jsonl)), ("validation.limit", 3)],
                     world="real")
    assert r.validation.benchmarks is None
    sets = validation_sets(r.validation, r.data, qwen_tokenizer())
    assert list(sets) == ["math4"] and len(sets["math4"]) == 3
    toy = build_recipe("rl", None, [], world="toy")
    assert list(validation_sets(toy.validation, toy.data, None)) == ["toy"]


@pytest.mark.slow
def test_rl_two_steps_from_a_local_jsonl(qwen3_base, math_jsonl, tmp_path):
    r = ok(run_main("rl", str(qwen3_base), "--out", str(tmp_path / "rl"), "--data", str(math_jsonl),
                    "--max-steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "3",
                    "--set", "validation.limit=2", "--set", "validation.num_generations=1", "--json", "-q"))
    assert r["steps"] == 2
    assert r["first_prompt"].endswith("\\boxed{}.")
    assert r["recipe"]["validation"]["max_new_tokens"] == 3  # validation samples like the run's rollouts
    assert (tmp_path / "rl" / "model.safetensors").is_file() or any((tmp_path / "rl").glob("*.safetensors"))


@pytest.mark.slow
def test_reheat_two_steps_with_the_chat_template(qwen3_instruct, math_jsonl, tmp_path):
    r = ok(run_main("reheat", str(qwen3_instruct), "--out", str(tmp_path / "hot"), "--data", str(math_jsonl),
                    "--chat-template", "--max-steps", "2", "--set", "train.prompts_per_step=2",
                    "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=3",
                    "--set", "validation.limit=2", "--set", "validation.num_generations=1",
                    "--set", "reheat.report_prompts=2", "--json", "-q"))
    assert r["steps"] == 2 and r["before"] is not None
    assert r["first_prompt"].startswith("<|im_start|>user\n") and r["recipe"]["data"]["chat_template"]


@pytest.mark.parametrize("name", ["qwen3_base", pytest.param("qwen3_untied", marks=pytest.mark.slow)])
def test_fold_on_a_real_checkpoint_needs_no_data(name, request, tmp_path):
    ckpt = request.getfixturevalue(name)
    r = ok(run_main("reheat", str(ckpt), "--method", "fold", "--temp", "1.6", "--out", str(tmp_path / "f"),
                    "--json", "-q"))
    assert r["method"] == "fold" and r["max_logit_error"] < 1e-3


def test_recipe_validate_every_shipped_recipe():
    files = sorted(str(p) for p in (ROOT / "recipes").glob("*/*.yaml"))
    res = run_main("recipe", "validate", *files)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("recipe", ["rl/qwen3-4b-base.yaml", "reheat/qwen3-4b-base.yaml"])
def test_plan_on_a_real_checkpoint_config(recipe, qwen3_base):
    res = run_main("plan", str(ROOT / "recipes" / recipe), "--model", str(qwen3_base), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and json.loads(res.stdout)


def test_the_world_of_a_checkpoint(tiny_ckpt, qwen3_base, tmp_path):
    from tsopsd_cli.tasks.toy import is_toy_checkpoint

    assert is_toy_checkpoint(tiny_ckpt) is True and is_toy_checkpoint(qwen3_base) is False
    assert is_toy_checkpoint(tmp_path / "missing") is None
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "config.json").write_text("{}")
    assert is_toy_checkpoint(tmp_path / "spm") is False  # a sentencepiece-only checkpoint is not a toy one


def test_validation_chat_template_of_named_benchmarks(benchmark_dir):
    from tsopsd_cli.recipe import ValidationSection
    from tsopsd_cli.tasks import validation_sets
    from tests.qwen_ckpt import INSTRUCT_EOS, qwen_tokenizer

    v = ValidationSection(benchmarks=["math500"], data_dir=benchmark_dir, limit=1, chat_template=True)
    p = validation_sets(v, None, qwen_tokenizer(INSTRUCT_EOS))["math500"][0]
    assert p.prompt.startswith("<|im_start|>user\n") and "\\boxed{}" in p.prompt
    plain = validation_sets(v.model_copy(update={"chat_template": False}), None, None)["math500"][0]
    assert plain.prompt.endswith("\\boxed{}.")


def test_chat_rendering_gives_the_chat_templates_tokens():
    from tsopsd_cli.engines import encode_prompts
    from tsopsd_cli.tasks.base import apply_chat_template
    from tests.qwen_ckpt import INSTRUCT_EOS, qwen_tokenizer

    tok = qwen_tokenizer(INSTRUCT_EOS)
    q = "What is $\\frac{1}{2}+\\frac{1}{3}$? Put your final answer in \\boxed{}."
    text = apply_chat_template(tok, q)
    assert tok(text)["input_ids"] == encode_prompts(tok, [q], chat_template=True)[0]


def test_eval_defaults_to_math500_on_a_real_checkpoint(qwen3_base, benchmark_dir):
    r = ok(run_main("eval", str(qwen3_base), "--data-dir", str(benchmark_dir), "--limit", "1", "-n", "1",
                    "--max-new-tokens", "3", "--json", "-q"))
    assert list(r["benchmarks"]) == ["math500"]
    from tsopsd_cli.recipe_loading import REAL_MAX_NEW_TOKENS, build_recipe

    assert build_recipe("eval", None, [], world="real").rollout.max_new_tokens == REAL_MAX_NEW_TOKENS
    assert build_recipe("eval", None, [], world="toy").eval.benchmarks == ["toy"]
    assert build_recipe("eval", None, [("eval.benchmarks", ["aime24"])], world="real").eval.benchmarks == ["aime24"]
