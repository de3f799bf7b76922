from __future__ import annotations

import random

from tsopsd_cli.tasks import toy
from tsopsd_cli.tasks.grading import extract_answer


def test_splits_are_disjoint_and_deterministic():
    test = toy.make_problems("test", 200, seed=0)
    train = toy.make_problems("train", 500, seed=0)
    assert not {p.expression for p in test} & {p.expression for p in train}
    assert [p.expression for p in toy.make_problems("test", 200, seed=0)] == [p.expression for p in test]
    assert [p.expression for p in toy.make_problems("test", 200, seed=1)] != [p.expression for p in test]
    assert len({p.expression for p in test}) == 200


def test_worked_solutions_are_correct_and_boxed():
    rng = random.Random(0)
    for p in toy.make_problems("train", 300, seed=3):
        assert eval(p.expression) == p.answer  # the expression is plain Python arithmetic
        sol = p.solution(rng)
        assert extract_answer(sol) == str(p.answer)
        lines = sol.splitlines()
        assert len(lines) == p.level + 1
        for line in lines[:-1]:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs)


def test_commutative_steps_are_written_both_ways():
    p = toy.ToyProblem("3+4", ((3, "+", 4),), 7, 1)
    seen = {p.solution(random.Random(s)).splitlines()[0] for s in range(20)}
    assert seen == {"3+4=7", "4+3=7"}


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
    import re

    problems = toy.make_problems("train", 400, seed=1, levels=(3,))
    rng = random.Random(0)
    wrong = 0
    for p in problems:
        text = p.solution(rng, slip_rate=0.2)
        *lines, boxed = text.splitlines()
        prev = None
        for line in lines:
            x, op, y, z = re.fullmatch(r"(-?\d+)([-+*])(-?\d+)=(-?\d+)", line).groups()
            x, y, z = int(x), int(y), int(z)
            exact = toy._apply(x, op, y)
            assert z == exact or 0 < abs(z - exact) <= 3  # a slip is small
            if prev is not None:  # the next step computes from what the previous line wrote
                assert prev in (x, y)
            prev = z
        assert boxed == f"\\boxed{{{prev}}}"
        wrong += prev != p.answer
    # three steps, each slipping with probability 0.2 -> about 1 - 0.8**3 = 0.49 wrong (slips rarely cancel)
    assert 0.38 < wrong / len(problems) < 0.58
    assert all(p.solution(random.Random(1)).endswith(f"{{{p.answer}}}") for p in problems)
