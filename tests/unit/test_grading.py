from __future__ import annotations

import pytest

from tsopsd_cli.tasks.grading import Grader, extract_answer, extract_boxed, normalize


@pytest.mark.parametrize("text,want", [
    (r"so \boxed{3} ... actually \boxed{204}", "204"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\fbox{7}", "7"),
    (r"\boxed {(1, 2)}", "(1, 2)"),
    ("no box here", None),
    (r"\boxed{unclosed", None),
])
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


def test_fallbacks():
    assert extract_answer("step\n#### 1,234") == "1,234"
    assert extract_answer("The answer is: 42.") == "42"
    assert extract_answer("Answer: $x=3$") == "x=3"
    assert extract_answer("nothing") is None


@pytest.mark.parametrize("a,b", [("27.0", "27"), ("025", "25"), ("1,000", "1000"), ("$5$", "5"),
                                 (r"\dfrac{1}{2}", r"\frac{1}{2}"), ("-3.", "-3")])
def test_normalize_equal(a, b):
    assert normalize(a) == normalize(b)


def test_grader_fast_path_and_math_verify():
    with Grader(workers=1, timeout=30) as g:
        res = g.grade_many([(r"\boxed{27.0}", "27"), (r"\boxed{0.5}", r"\frac{1}{2}"), (r"\boxed{3}", "4"),
                            ("", "1"), (r"\boxed{\frac{2}{4}}", "0.5")])
    assert [r.correct for r in res] == [True, True, False, False, True]


def test_grader_time_limit_kills_slow_checks():
    # 50 ms is far below a worker's start-up and math-verify import: the check overruns and is graded wrong.
    with Grader(workers=1, timeout=0.05) as g:
        res = g.grade_many([(r"\boxed{\sqrt{2}}", r"2^{1/2}")])
        assert res[0].correct is False and res[0].timed_out and g.timeouts == 1
