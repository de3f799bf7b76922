"""`tsopsd eval` and `tsopsd eval grade` (`main(argv)` in this process; the eval killed mid-way is a process of
its own)."""

from __future__ import annotations

import json
import math
import signal
import time

import pytest

from tests.conftest import one_error_line, run_cli, run_main, start_cli


def eval_json(*args, run=run_main):
    p = run("eval", *args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.slow
def test_eval_toy_report_and_samples(toy_base, tmp_path):
    out = tmp_path / "ev"
    r = eval_json(str(toy_base), "--benchmark", "toy", "--limit", "24", "-n", "4", "--out", str(out))
    b = r["benchmarks"]["toy"]
    assert b["problems"] == 24 and b["samples_per_problem"] == 4
    assert set(b["pass@k"]) == {"1", "2", "4"} and b["pass@k"]["1"] == pytest.approx(b["avg@4"])
    assert b["pass@k"]["1"] <= b["pass@k"]["2"] <= b["pass@k"]["4"]
    assert 0 < b["mean_token_entropy"] and 0 < b["mean_length"] <= 48
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 96
    assert set(lines[0]) >= {"problem_id", "sample_index", "completion", "extracted", "correct", "length",
                             "finish_reason"}
    assert sum(x["correct"] for x in lines) / 96 == pytest.approx(b["avg@4"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["fingerprint"] == r["fingerprint"] and saved["macro"]["accuracy"] == pytest.approx(b["accuracy"])
    assert not list(tmp_path.glob(".*"))


def test_eval_on_real_benchmark_records_runs(benchmark_dir, tmp_path):
    from tests.conftest import make_tiny_checkpoint

    # the toy tokenizer spells an AIME problem in ~600 characters: a context that takes them
    ckpt = make_tiny_checkpoint(tmp_path / "long", context=2048)
    out = tmp_path / "ev"
    r = eval_json(str(ckpt), "--benchmark", "aime24,amc23", "--data-dir", str(benchmark_dir),
                  "--limit", "2", "-n", "2", "--max-new-tokens", "4", "--out", str(out))
    assert set(r["benchmarks"]) == {"aime24", "amc23"} and r["benchmarks"]["aime24"]["problems"] == 2
    # the golds graded against are the records' own answers, normalised (AMC's 27.0 -> 27)
    from tsopsd_cli.tasks.base import answer_text

    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for name in ("aime24", "amc23"):
        records = [json.loads(x) for x in (benchmark_dir / f"{name}.jsonl").read_text().splitlines()][:2]
        golds = {answer_text(rec.get("answer", rec.get("Answer"))) for rec in records}
        assert {s["answer"] for s in samples if s["benchmark"] == name} == golds
    # and a completion boxing each gold is graded correct: the whole path from the records to the grader works
    graded = tmp_path / "right.jsonl"
    graded.write_text("".join(json.dumps({"completion": f"so the answer is \\boxed{{{s['answer']}}}.",
                                          "answer": s["answer"]}) + "\n" for s in samples))
    p = run_main("eval", "grade", str(graded), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["accuracy"] == 1.0


def test_eval_bad_inputs(tiny_ckpt, tmp_path):
    assert "unknown benchmark 'nope'" in one_error_line(run_main("eval", str(tiny_ckpt), "--benchmark", "nope"))
    line = one_error_line(run_main("eval", str(tiny_ckpt), "--benchmark", "aime24", "--data-dir", str(tmp_path)))
    assert "no aime24.jsonl" in line


@pytest.mark.slow
def test_interrupted_eval_resumes_and_matches_uninterrupted(toy_base, tmp_path):
    args = [str(toy_base), "--benchmark", "toy", "--limit", "48", "-n", "2", "--set", "eval.chunk_problems=4"]
    full = eval_json(*args, "--out", str(tmp_path / "full"))
    out = tmp_path / "resumed"
    partial = tmp_path / ".resumed.partial" / "samples.jsonl"
    proc = start_cli("eval", *args, "--out", str(out), "--json")
    deadline = time.time() + 120
    while time.time() < deadline and (not partial.exists() or len(partial.read_text().splitlines()) < 16):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(partial.read_text().splitlines())
    assert 16 <= kept < 96 and not out.exists()
    resumed = eval_json(*args, "--out", str(out))
    assert resumed["benchmarks"]["toy"] == full["benchmarks"]["toy"]
    a = (tmp_path / "full" / "samples.jsonl").read_text().splitlines()
    b = (out / "samples.jsonl").read_text().splitlines()
    assert sorted(a) == sorted(b)
    # a different recipe does not silently reuse or discard someone's partial eval
    (tmp_path / ".other.partial").mkdir()
    (tmp_path / ".other.partial" / "state.json").write_text('{"key": "something else"}')
    line = one_error_line(run_main("eval", *args, "--out", str(tmp_path / "other")))
    assert "pass --restart" in line


def test_eval_grade(tmp_path):
    f = tmp_path / "c.jsonl"
    rows = [{"completion": r"so \boxed{27}", "answer": 27.0}, {"completion": r"\boxed{\frac12}", "answer": "0.5"},
            {"completion": "no idea", "answer": "3"}, {"completion": r"\boxed{9^{9^{9^{9}}}}", "answer": "5"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_main("eval", "grade", str(f), "--json", "--timeout", "2", "--out", str(tmp_path / "g"))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["n"] == 4 and r["accuracy"] == pytest.approx(0.5) and r["timeouts"] == 1
    graded = [json.loads(x) for x in (tmp_path / "g" / "graded.jsonl").read_text().splitlines()]
    assert [g["correct"] for g in graded] == [True, True, False, False]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert "needs a string 'completion'" in one_error_line(run_main("eval", "grade", str(bad)))


@pytest.mark.vllm
def test_vllm_and_hf_engines_agree_on_toy_accuracy(toy_base):
    pytest.importorskip("vllm")
    args = [str(toy_base), "--benchmark", "toy", "--limit", "100", "-n", "4", "--device", "cpu"]
    hf = eval_json(*args, "--engine", "hf")["benchmarks"]["toy"]
    vl = eval_json(*args, "--engine", "vllm", "--set", "rollout.vllm.max_model_len=128",
                   run=run_cli)["benchmarks"]["toy"]  # vLLM in a process of its own
    p1, p2, n = hf["avg@4"], vl["avg@4"], 400
    se = math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n)
    assert 0.05 < p1 < 0.95 and abs(p1 - p2) < 4 * se + 1e-9, (p1, p2)
    assert abs(hf["mean_length"] - vl["mean_length"]) < 0.2 * hf["mean_length"]
    assert vl["mean_token_entropy"] == pytest.approx(hf["mean_token_entropy"], rel=0.5, abs=0.05)


def test_a_custom_set_named_like_a_benchmark_asked_for_is_refused_and_its_name_is_the_files(tiny_ckpt, tmp_path):
    """#31: `eval -b aime24 --data my/aime24.jsonl` replaced the built-in set with the file's problems under the
    same name. And the custom set's name was read back from its first problem id, cut at the last '-'."""
    data = tmp_path / "toy.jsonl"
    data.write_text(json.dumps({"id": "a-1", "problem": "1+1=?", "answer": "2"}) + "\n")
    line = one_error_line(run_cli("eval", str(tiny_ckpt), "-b", "toy", "--data", str(data), "-n", "1",
                                  "--max-new-tokens", "4", "--out", str(tmp_path / "e")))
    assert "toy" in line and "--data" in line and "rename" in line, line
    assert sorted(x.name for x in tmp_path.iterdir()) == ["toy.jsonl"]
    custom = tmp_path / "mine.jsonl"
    data.rename(custom)
    r = eval_json(str(tiny_ckpt), "-b", "toy", "--limit", "2", "--data", str(custom), "-n", "1",
                  "--max-new-tokens", "4")
    assert set(r["benchmarks"]) == {"toy", "mine"}
