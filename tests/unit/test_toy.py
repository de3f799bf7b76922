from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from tsopsd_cli.tasks import toy
from tsopsd_cli.tasks.base import Problem
from tsopsd_cli.tasks.grading import extract_answer


def test_splits_are_disjoint_and_deterministic():
    test = toy.make_problems("test", 200, seed=0)
    train = toy.make_problems("train", 500, seed=0)
    assert not {p.expression for p in test} & {p.expression for p in train}
    assert all(toy.split_of(p.expression) == "test" for p in test)
    assert all(toy.split_of(p.expression) == "train" for p in train)
    assert [p.expression for p in toy.make_problems("test", 200, seed=0)] == [p.expression for p in test]
    assert [p.expression for p in toy.make_problems("test", 200, seed=1)] != [p.expression for p in test]
    assert len({p.expression for p in test}) == 200


def test_worked_solutions_are_correct_and_boxed():
    for p in toy.make_problems("train", 300, seed=3):
        assert eval(p.expression) == p.answer  # the expression is plain Python arithmetic
        sol = p.solution()
        assert extract_answer(sol) == str(p.answer)
        plan, *lines, boxed = sol.splitlines()
        assert plan == ("L" if p.family == "bracket" else "P") and len(lines) == p.level
        for line in lines:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs) <= toy.MAX_VALUE
        assert boxed == f"\\boxed{{{p.answer}}}"


@pytest.mark.parametrize("expr,family", [
    ("3+4*2", "precedence"), ("1+2+3*4", "precedence"), ("2*3+4*2", "precedence"),
    ("(3+4)*2", "bracket"), ("(1+2+3)*2", "bracket"), ("(2*3+1)*2", "bracket"),
    ("3*4+2", "neutral"), ("(2*3)+4", "neutral"), ("1+2+3", "neutral"), ("4+5", "neutral"),
    ("2*(3+4)", None),  # neither plan is right: never drawn
    ("9+9*2", None),  # the correct solution computes 18+9 = 27 > MAX_VALUE
])
def test_families_by_which_plan_is_right(expr, family):
    operands, ops, bracket = toy.parse_expression(expr + "=?\n")
    assert toy.classify(operands, ops, bracket) == family
    if family is None:
        return
    answers = {h: toy.habit_lines(operands, ops, h)[-1][3] for h in toy.HABITS}
    right = {h for h, a in answers.items() if a == eval(expr)}
    assert right == ({"prec", "ltr"} if family == "neutral" else {"prec" if family == "precedence" else "ltr"})


def test_the_careless_corpus_picks_the_plan_independently_of_the_problem():
    """The SFT corpus's plan letter is P with probability PREC_SHARE = 0.5 in every family, so a bracket
    (precedence) problem has a wrong worked solution half the time. Bounds: 4 standard deviations of a binomial
    proportion (false-failure probability < 1e-4 per family)."""
    stream = toy.iter_train_examples(seed=5)
    plans: dict[str, Counter] = {}
    levels: Counter = Counter()
    for _ in range(6000):
        prompt, sol = next(stream)
        p = toy.make_problem(prompt)
        plans.setdefault(p.family, Counter())[sol[0]] += 1
        levels[p.level, p.family] += 1
        assert (extract_answer(sol) == str(p.answer)) == (p.correct_habit in (None, "prec" if sol[0] == "P" else
                                                                                "ltr"))
    for fam, c in plans.items():
        n = c["P"] + c["L"]
        assert n == sum(c.values()) and n > 300, (fam, c)
        assert abs(c["P"] / n - toy.PREC_SHARE) < 4 * math.sqrt(0.25 / n), (fam, c)
    # levels are drawn uniformly (level 1 is all neutral), then families with FAMILY_WEIGHTS: the bracket
    # family is the rare one
    multi = sum(v for (lvl, _), v in levels.items() if lvl > 1)
    for fam, w in toy.FAMILY_WEIGHTS.items():
        share = sum(v for (lvl, f), v in levels.items() if lvl > 1 and f == fam) / multi
        assert abs(share - w) < 4 * math.sqrt(w * (1 - w) / multi), (fam, share)
    assert abs(sum(v for (lvl, _), v in levels.items() if lvl == 1) / 6000 - 1 / 3) < 0.03


def test_problem_sets_mix_the_families():
    for split, n in (("train", 2048), ("test", 256)):
        fams = Counter(p.family for p in toy.make_problems(split, n, seed=0))
        assert fams["precedence"] > 0.45 * n and 0.08 * n < fams["bracket"] < 0.25 * n, fams
    p = toy.make_problems("test", 5, seed=0)[0].to_problem(0)
    assert set(p.meta) == {"level", "family", "expression"}


def test_decision_positions_hand_written():
    p = toy.make_problem("(3+4)*2+5=?\n")
    assert p.family == "bracket" and p.correct_habit == "ltr"
    right = "L\n3+4=7\n7*2=14\n14+5=19\n\\boxed{19}"
    wrong = "P\n4*2=8\n3+8=11\n11+5=16\n\\boxed{16}"
    assert p.solution() == right
    assert toy.decision_positions(p, right) == [0]
    assert toy.trace_decisions(p, right) == [(0, "ltr")] and toy.trace_decisions(p, wrong) == [(0, "prec")]
    assert toy.trace_decisions(p, "3+4=7") == [(0, None)]  # no plan letter: still the decision point, neither plan
    assert toy.decision_positions(p, "") == []
    # token ids of the character-level tokenizer: the same positions; decoding stops at end-of-sequence
    tok = toy.build_tokenizer()
    ids = tok(wrong)["input_ids"] + [tok.eos_token_id] + tok("L")["input_ids"]
    assert toy.decision_positions(p, ids) == [0] and toy.trace_decisions(p, ids) == [(0, "prec")]
    assert toy.decision_positions(p, [tok.eos_token_id]) == []
    # the problem may be given as a Problem, an expression or a prompt
    for q in (p.to_problem(3), p.expression, p.prompt, Problem(id="x", prompt=p.prompt)):
        assert toy.decision_positions(q, right) == [0]


def test_decision_entropy_means():
    ents = [0.7, 0.01, 0.03, 0.02]
    assert toy.decision_entropy_means(ents, [0]) == pytest.approx((0.7, 0.02))
    assert toy.decision_entropy_means(ents, []) == (None, pytest.approx(0.19))
    assert toy.decision_entropy_means([], []) == (None, None)
    # several completions: token-weighted means over all of them
    at, other = toy.decision_entropy_means([[0.6, 0.1], [0.2, 0.0, 0.2]], [[0], [0]])
    assert at == pytest.approx(0.4) and other == pytest.approx(0.1)


def test_train_stream_never_yields_test_problems():
    test = {p.prompt for p in toy.make_problems("test", 500, seed=0)}
    stream = toy.iter_train_examples(0)
    assert not any(next(stream)[0] in test for _ in range(2000))


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = toy.build_tokenizer()
    text = "((7+5)*3)-4=?\n12*3=36\n\\boxed{-4} Any ASCII: ~!@#"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.eos_token == toy.EOS_TOKEN and again.pad_token == toy.PAD_TOKEN
    assert again.padding_side == "left"


def test_slipped_solutions_are_coherent_and_wrong_at_about_the_slip_rate():
    problems = toy.make_problems("train", 400, seed=1, levels=(3,))
    rng = random.Random(0)
    wrong = 0
    for p in problems:
        habit = p.correct_habit or "prec"
        text = p.solution(rng, slip_rate=0.2, prec_share=1.0 if habit == "prec" else 0.0)
        plan, *lines, boxed = text.splitlines()
        assert plan == toy.PLAN[habit]
        operands, ops, _ = toy.parse_expression(p.expression)
        flat = toy._flat(operands, ops)
        for line in lines:  # each line is the plan's next operation on the values written so far
            x, op, y, z = re.fullmatch(r"(-?\d+)([-+*])(-?\d+)=(-?\d+)", line).groups()
            k = toy._pick(flat, habit)
            assert [int(x), op, int(y)] == flat[2 * k:2 * k + 3]
            exact = toy._apply(int(x), op, int(y))
            assert int(z) == exact or 0 < abs(int(z) - exact) <= 3  # a slip is small
            flat = toy._reduce(flat, k, int(z))
        assert boxed == f"\\boxed{{{flat[0]}}}"
        wrong += flat[0] != p.answer
    # three steps, each slipping with probability 0.2 -> about 1 - 0.8**3 = 0.49 wrong (slips rarely cancel)
    assert 0.38 < wrong / len(problems) < 0.58
    assert all(p.solution().endswith(f"{{{p.answer}}}") for p in problems)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is fastest, and a second one stalls for seconds per step on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_briefly_trained_base_is_diverse_at_the_decision_point(one_thread):
    """80 SFT steps of a 2-layer, width-32 model (a few seconds). The corpus picks P or L with probability 1/2
    whatever the problem, and the plan letter's marginal is the first thing cross-entropy fits; so at the
    decision point the model samples both letters. Bounds: with 128 samples, each letter at least 16 times
    (a model with P(P) in [0.25, 0.75] fails this with probability < 1e-4), mean entropy at the decision point
    above 0.5 nats (P(P) within about [0.2, 0.8]; ln 2 = 0.69 is the corpus's). (After 80 steps
    the tokens elsewhere are not sharp yet; the shipped base's are, measured in docs/toy.md.)"""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen3ForCausalLM

    from tsopsd_cli.engines import SamplingParams, encode_prompts
    from tsopsd_cli.engines.hf import HFEngine
    from tsopsd_cli.runners.toy_init import sft_batch

    torch.manual_seed(0)
    tok = toy.build_tokenizer()
    model = Qwen3ForCausalLM(toy.build_model_config(len(tok), 32, 2, 2, 64, 128, tok.pad_token_id,
                                                    tok.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = toy.iter_train_examples(0)
    for _ in range(80):
        x, mask, y = sft_batch(tok, [next(stream) for _ in range(32)])
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), ignore_index=-100).backward()
        opt.step()
        opt.zero_grad()
    problems = toy.make_problems("test", 32, seed=0)
    comps = HFEngine(model.eval(), tok, batch_size=128).generate(
        encode_prompts(tok, [p.prompt for p in problems]),
        SamplingParams(num_generations=4, temperature=1.0, max_new_tokens=24, seed=0))
    letters = Counter(c.text[:1] for c in comps)
    assert letters["P"] >= 16 and letters["L"] >= 16, letters
    pos = [toy.decision_positions(problems[c.prompt_index], c.token_ids) for c in comps]
    assert all(q == [0] for q in pos)
    at, other = toy.decision_entropy_means([c.entropies for c in comps], pos)
    assert at > 0.5, (at, other)


def test_family_subsets_draw_only_those_families_and_leave_the_natural_draw_alone():
    natural = toy.make_problems("train", 64, 3)
    assert natural == toy.make_problems("train", 64, 3, families=toy.FAMILIES)  # the default path, unchanged
    assert natural == toy.make_problems("train", 64, 3, families=("neutral", "bracket", "precedence"))
    sub = toy.make_problems("train", 200, 3, families=("bracket", "neutral"))
    assert sub == toy.make_problems("train", 200, 3, families=("neutral", "bracket"))
    count = Counter(p.family for p in sub)
    assert set(count) == {"bracket", "neutral"} and count["bracket"] > 40
    only = toy.make_problems("test", 30, 0, families=("bracket",))
    assert {p.family for p in only} == {"bracket"} and {p.level for p in only} <= {2, 3}
    assert all(toy.split_of(p.expression) == "test" for p in only)
    with pytest.raises(toy.DataError, match="level 1 problems are all neutral"):
        toy.make_problems("test", 3, 0, levels=(1,), families=("bracket",))


def test_a_family_pool_is_every_problem_of_it_in_the_split():
    pool = toy.family_problems("test", "bracket")
    assert len(pool) == 127 == len({p.expression for p in pool})
    assert [p.expression for p in pool] == sorted(p.expression for p in pool)
    assert all(p.family == "bracket" and toy.split_of(p.expression) == "test" for p in pool)
    assert all(toy.make_problem(p.expression) == p for p in pool)
    # the draw of the same family finds nothing outside the pool
    drawn = {p.expression for p in toy.make_problems("test", 60, 1, families=("bracket",))}
    assert drawn <= {p.expression for p in pool}
    assert len(toy.family_problems("train", "bracket")) == 990


def test_right_plan_of_a_completion():
    bracket, prec, neutral = toy.make_problem("(3+4)*2"), toy.make_problem("3+4*2"), toy.make_problem("3*4+2")
    assert toy.right_plan(bracket, "L\n3+4=7\n7*2=14\n\\boxed{14}") is True
    assert toy.right_plan(bracket, "P\n4*2=8") is False
    assert toy.right_plan(bracket, "") is False
    assert toy.right_plan(prec, "P\n4*2=8") is True
    assert toy.right_plan(neutral, "P") is None
    tok = toy.build_tokenizer()
    assert toy.right_plan(bracket.to_problem(0), tok("L\n3+4")["input_ids"]) is True
    from tsopsd_cli.tasks import right_plan

    assert right_plan(bracket.to_problem(0), "L") is True
    assert right_plan(Problem(id="x", prompt="1+1", answer="2"), "L") is None


def test_the_toy_family_sets():
    from tsopsd_cli.tasks.benchmarks import NAMES, load_benchmark

    assert {"toy", "toy-bracket", "toy-precedence", "toy-neutral"} <= set(NAMES)
    full = load_benchmark("toy-bracket", None, "{question}", toy_num=1000)
    assert len(full) == 127 and all(p.meta["family"] == "bracket" for p in full)
    again = load_benchmark("toy-bracket", None, "{question}", toy_num=1000)
    assert [p.prompt for p in full] == [p.prompt for p in again]
    other = load_benchmark("toy-bracket", None, "{question}", toy_num=1000, toy_seed=1)
    assert [p.prompt for p in other] != [p.prompt for p in full] and sorted(p.prompt for p in other) == sorted(
        p.prompt for p in full)
    assert len(load_benchmark("toy-bracket", None, "{question}", toy_num=20)) == 20
