"""The entropy thermostat's rules on synthetic entropy series: when a reheat phase starts and ends."""

from __future__ import annotations

from tsopsd_cli.recipe import ThermostatSection
from tsopsd_cli.training.thermostat import Thermostat


def section(**kw):
    return ThermostatSection(enabled=True, **kw)


def test_fires_at_the_first_step_whose_full_window_is_below_the_threshold_and_not_before():
    t = Thermostat(section(window=3, threshold=0.5, min_gap=1))
    fired = [t.after_grpo_step(step, e) for step, e in enumerate([0.9, 0.6, 0.45, 0.45, 0.44, 0.40], start=1)]
    # means of full windows: step 3: 0.65, step 4: 0.5 (not below), step 5: 0.4467 -> fires
    assert fired == [False, False, False, False, True, False]  # (nothing is recorded while reheating)
    assert t.reheating and t.state["phases"][0]["trigger_step"] == 5 and t.state["phases"][0]["first_step"] == 6


def test_the_threshold_ratio_is_relative_to_the_first_step():
    t = Thermostat(section(window=2, threshold_ratio=0.5, min_gap=1))
    assert [t.after_grpo_step(s, e) for s, e in enumerate([2.0, 1.1, 1.0, 0.9], start=1)] == [False, False, False,
                                                                                              True]
    assert t.threshold() == 1.0


def test_the_minimum_gap_holds_before_the_first_phase_and_between_phases():
    t = Thermostat(section(window=2, threshold=1.0, min_gap=6, max_phase_steps=2, target_entropy_ratio=None))
    low = 0.1
    assert not any(t.after_grpo_step(s, low) for s in range(1, 6))  # steps 1..5: gap not reached (6 needed)
    assert t.after_grpo_step(6, low)
    assert not t.after_reheat_step(7, 0.2, 1.0) and t.after_reheat_step(8, 0.2, 1.0)  # max_phase_steps = 2
    assert t.state["phases"][0]["stop"] == "max_phase_steps 2" and t.state["last_end"] == 8
    starts = [s for s in range(9, 20) if t.after_grpo_step(s, low)]
    assert starts == [14]  # 6 GRPO steps after the phase ended at step 8 (and a fresh window)
    assert t.spans() == [(7, 8)]


def test_a_phase_ends_when_the_student_reaches_the_target():
    t = Thermostat(section(window=1, threshold=1.0, min_gap=1, target_entropy_ratio=0.5, max_phase_steps=10))
    assert t.after_grpo_step(1, 0.3)
    assert not t.after_reheat_step(2, 0.3, 1.0)
    assert t.after_reheat_step(3, 0.55, 1.0)
    p = t.state["phases"][0]
    assert p["steps"] == 2 and p["entropy_after"] == 0.55 and p["stop"].startswith("target_entropy_ratio")
    assert not t.reheating and t.state["window"] == []
    t2 = Thermostat(section(window=1, threshold=1.0, min_gap=1, target_entropy=0.4))
    assert t2.after_grpo_step(1, 0.3) and t2.after_reheat_step(2, 0.41, 5.0)


def test_disabled_or_without_entropy_never_fires():
    t = Thermostat(ThermostatSection(enabled=False, threshold=10.0, window=1, min_gap=1))
    assert not any(t.after_grpo_step(s, 0.0) for s in range(1, 20))
    t = Thermostat(section(threshold=10.0, window=1, min_gap=1))
    assert not t.after_grpo_step(1, None) and t.state["first_entropy"] is None


def test_the_state_round_trips_through_a_checkpoint():
    import torch

    t = Thermostat(section(window=2, threshold=1.0, min_gap=1))
    t.after_grpo_step(1, 0.2)
    t.after_grpo_step(2, 0.2)
    import io

    buf = io.BytesIO()
    torch.save({"thermostat": t.state}, buf)
    buf.seek(0)
    back = Thermostat(t.s, torch.load(buf, weights_only=True)["thermostat"])
    assert back.reheating and back.state == t.state
