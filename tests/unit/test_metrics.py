from __future__ import annotations

import pytest

from tsopsd_cli.core.metrics import benchmark_metrics, ks_for, majority_correct, pass_at_k


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)  # C(7,4)=35, C(10,4)=210
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(4) == [1, 2, 4]
    assert ks_for(6) == [1, 2, 4, 6]


def test_majority_vote():
    assert majority_correct(["3", "3", "4"], [True, True, False])
    assert not majority_correct(["4", "3", "4"], [False, True, False])
    assert majority_correct(["3", "4"], [True, False])  # tie: the answer seen first wins
    assert not majority_correct([None, None], [False, False])
    assert majority_correct([None, None, "7"], [False, False, True])  # missing answers do not vote


def test_benchmark_metrics_hand_computed():
    def s(ok, ans, length=10, fin="stop", ent=0.5):
        return {"correct": ok, "answer_key": ans, "length": length, "finish_reason": fin, "entropy": ent}

    groups = [[s(True, "1"), s(False, "2"), s(False, "2"), s(False, None, 20, "length", 1.0)],
              [s(True, "5"), s(True, "5"), s(True, "5"), s(False, "6")]]
    m = benchmark_metrics(groups)
    assert m["avg@4"] == pytest.approx(4 / 8) == m["accuracy"]
    assert m["pass@k"]["1"] == pytest.approx((0.25 + 0.75) / 2)
    assert m["pass@k"]["2"] == pytest.approx(((1 - 3 / 6) + 1.0) / 2)
    assert m["pass@k"]["4"] == pytest.approx(1.0)
    assert m["maj@4"] == pytest.approx(0.5)  # first problem: "2" wins (wrong); second: "5" (right)
    assert m["mean_length"] == pytest.approx(90 / 8)
    assert m["truncation_rate"] == pytest.approx(1 / 8)
    assert m["mean_token_entropy"] == pytest.approx((0.5 * 70 + 1.0 * 20) / 90)  # token-weighted


def test_right_plan_share_only_where_problems_have_one():
    from tsopsd_cli.core.metrics import benchmark_metrics

    s = lambda ok, plan: {"correct": ok, "answer_key": None, "length": 3, "finish_reason": "stop",  # noqa: E731
                          "entropy": None, "right_plan": plan}
    m = benchmark_metrics([[s(True, True), s(False, False)], [s(True, None), s(True, None)],
                           [s(False, False), s(True, True)]])
    assert m["right_plan"] == 0.5
    assert "right_plan" not in benchmark_metrics([[s(True, None)]])
