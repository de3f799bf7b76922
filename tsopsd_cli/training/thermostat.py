"""When the entropy thermostat of `tsopsd rl` starts and ends a reheat phase: a pure function of the rollout-entropy
series and the recipe's `thermostat` section, with a plain-dict state that checkpoints save and resumes restore.

Rules (each a recipe option):
- Watch: after every GRPO step, the step's rollout token entropy joins a running window of `window` steps.
- Start: when the window is full, at least `min_gap` GRPO steps have passed since the run's start or the last
  phase's end, and the window's mean is below `threshold` (nats) or `threshold_ratio` x the run's first-step
  entropy. The next step is then the first TS-OPSD step of the phase.
- End: after a TS-OPSD step whose student entropy reached `target_entropy` (nats) or `target_entropy_ratio` x the
  teacher's entropy on the same tokens, or after `max_phase_steps` steps. The window starts empty again, so a new
  phase needs `window` fresh GRPO steps as well as the gap.
"""

from __future__ import annotations


class Thermostat:
    def __init__(self, section, state: dict | None = None):
        self.s = section
        self.state = state or {"phase": "grpo", "window": [], "first_entropy": None, "last_end": 0,
                               "phase_steps": 0, "phases": []}

    @property
    def reheating(self) -> bool:
        return self.state["phase"] == "reheat"

    def threshold(self) -> float | None:
        if self.s.threshold is not None:
            return self.s.threshold
        first = self.state["first_entropy"]
        return None if first is None else self.s.threshold_ratio * first

    def after_grpo_step(self, step: int, entropy: float | None) -> bool:
        """Record GRPO step `step`'s rollout entropy; True when a reheat phase starts with the next step."""
        st = self.state
        if not self.s.enabled or entropy is None or self.reheating:
            return False
        if st["first_entropy"] is None:
            st["first_entropy"] = entropy
        st["window"] = (st["window"] + [entropy])[-self.s.window:]
        mean = sum(st["window"]) / len(st["window"])
        if len(st["window"]) < self.s.window or step - st["last_end"] < self.s.min_gap or not mean < self.threshold():
            return False
        st.update(phase="reheat", phase_steps=0)
        st["phases"].append({"trigger_step": step, "first_step": step + 1, "last_step": None, "steps": 0,
                             "entropy_before": mean, "threshold": self.threshold(), "entropy_after": None,
                             "stop": None})
        return True

    def after_reheat_step(self, step: int, student_entropy: float, teacher_entropy: float) -> bool:
        """Record TS-OPSD step `step`; True when the phase ends with it (GRPO resumes with the next step)."""
        st = self.state
        st["phase_steps"] += 1
        phase = st["phases"][-1]
        stop = None
        if self.s.target_entropy is not None and student_entropy >= self.s.target_entropy:
            stop = f"target_entropy {self.s.target_entropy}"
        elif (self.s.target_entropy_ratio is not None
              and student_entropy >= self.s.target_entropy_ratio * teacher_entropy):
            stop = f"target_entropy_ratio {self.s.target_entropy_ratio}"
        elif st["phase_steps"] >= self.s.max_phase_steps:
            stop = f"max_phase_steps {self.s.max_phase_steps}"
        phase.update(last_step=step, steps=st["phase_steps"], entropy_after=student_entropy, stop=stop)
        if stop is None:
            return False
        st.update(phase="grpo", window=[], last_end=step, phase_steps=0)
        return True

    def spans(self) -> list[tuple[int, int]]:
        return [(p["first_step"], p["last_step"]) for p in self.state["phases"] if p["last_step"] is not None]

    def report(self) -> dict:
        return {"enabled": self.s.enabled, "phases": self.state["phases"], "count": len(self.state["phases"]),
                "reheat_steps": sum(p["steps"] for p in self.state["phases"])}
