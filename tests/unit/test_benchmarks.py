from __future__ import annotations

import json

import pytest

from tsopsd_cli.errors import DataError
from tsopsd_cli.tasks.base import render_template
from tsopsd_cli.tasks.benchmarks import (PROMPT_TEMPLATES, load_benchmark, load_custom, parse_names,
                                         template_text)


@pytest.mark.parametrize("name,count,first_gold", [
    ("math500", 500, None), ("aime24", 30, None), ("aime25", 30, None), ("amc23", 40, None), ("gsm8k", 1319, None),
])
def test_local_benchmarks_load_with_normalised_golds(benchmark_dir, name, count, first_gold):
    probs = load_benchmark(name, benchmark_dir, template_text("boxed"))
    assert len(probs) == count and len({p.id for p in probs}) == count
    assert all(p.answer for p in probs)
    assert all(p.prompt.endswith("put your final answer within \\boxed{}.") for p in probs)


def test_gold_normalisers(benchmark_dir):
    amc = load_benchmark("amc23", benchmark_dir, "{question}")
    assert all("." not in p.answer for p in amc if p.answer.replace(".", "").isdigit())  # 27.0 -> 27
    gsm = load_benchmark("gsm8k", benchmark_dir, "{question}")
    assert all("####" not in p.answer and "," not in p.answer for p in gsm)
    raw = json.loads(open(benchmark_dir / "gsm8k.jsonl").readline())
    assert gsm[0].answer == raw["answer"].split("####")[-1].strip().replace(",", "")
    aime = load_benchmark("aime24", benchmark_dir, "{question}", limit=5)
    assert len(aime) == 5


def test_names_and_templates():
    assert parse_names(["aime24,math500", "toy", "aime24"]) == ["aime24", "math500", "toy"]
    with pytest.raises(DataError, match="unknown benchmark 'mathh'"):
        parse_names(["mathh"])
    assert template_text("plain") == "{question}"
    assert template_text("Q: {question}\nA:") == "Q: {question}\nA:"
    with pytest.raises(DataError):
        template_text("nonsense")
    assert "\\boxed{}" in render_template(PROMPT_TEMPLATES["boxed"], "x")


def test_missing_local_copy_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no aime24.jsonl"):
        load_benchmark("aime24", tmp_path, "{question}")


def test_custom_set_and_toy(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"q": "1+1?", "a": 2.0}\n{"q": "2+2?", "a": "4"}\n')
    probs = load_custom(f, "q", "a", "{question}")
    assert [p.answer for p in probs] == ["2", "4"] and probs[0].id.startswith("mine-")
    with pytest.raises(DataError, match="no question"):
        load_custom(f, "question", "a", "{question}")
    toy = load_benchmark("toy", None, "ignored {question}", toy_num=10)
    assert len(toy) == 10 and toy[0].prompt.endswith("=?\n")
