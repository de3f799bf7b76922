"""Validation during training (rl, reheat): the eval metrics on a fixed problem set with fixed per-problem seeds,
so that the numbers of different steps and runs are comparable. With several processes each one samples and
grades every world-th problem (the same seeds as one process would use) and the main process merges them: no
process waits idle in a collective while another validates."""

from __future__ import annotations

from typing import Callable

from tsopsd_cli.core.metrics import benchmark_metrics
from tsopsd_cli.engines import encode_prompts, sampling_params
from tsopsd_cli.tasks import right_plan, validation_sets
from tsopsd_cli.tasks.grading import Grader, normalize


class Validator:
    def __init__(self, section, tokenizer, data=None, grader_timeout: float = 5.0):
        """`section`: the recipe's `validation`; `data`: the run's prompt source, validated on when the section
        names no benchmarks (tasks.validation_sets)."""
        if data is None and section.benchmarks is None:
            from tsopsd_cli.recipe import ToyData

            data = ToyData()
        self.sets = validation_sets(section, data, tokenizer)
        self.tokenizer = tokenizer
        self.section = section
        self.grader_timeout = grader_timeout

    def run(self, generate: Callable, dist) -> dict:
        """`generate(prompt_ids, SamplingParams) -> completions` (this process's engine). Returns, on every
        process, {'accuracy', 'pass@k', 'entropy', 'mean_length', 'right_plan', 'benchmarks'} (macro over
        benchmarks; right_plan over those whose problems have a right plan, else None)."""
        per = {}
        with Grader(workers=1, timeout=self.grader_timeout) as grader:
            for name, problems in self.sets.items():
                mine = list(range(dist.rank, len(problems), dist.world))
                groups: dict[int, list[dict]] = {i: [] for i in mine}
                if mine:
                    params = sampling_params(self.section, row_seeds=tuple(mine))
                    comps = generate(encode_prompts(self.tokenizer, [problems[i].prompt for i in mine]), params)
                    grades = grader.grade_many([(c.text, problems[mine[c.prompt_index]].answer) for c in comps])
                    for c, g in zip(comps, grades):
                        groups[mine[c.prompt_index]].append({
                            "correct": g.correct, "answer_key": normalize(g.extracted) if g.extracted else None,
                            "length": len(c.token_ids), "finish_reason": c.finish_reason,
                            "entropy": c.mean_entropy,
                            "right_plan": right_plan(problems[mine[c.prompt_index]], c.token_ids)})
                merged: dict[int, list[dict]] = {}
                for part in dist.gather_objects(groups):
                    merged.update(part)
                per[name] = benchmark_metrics([merged[i] for i in range(len(problems))])
        n = len(per)
        first = next(iter(per.values()))
        return {
            "accuracy": sum(b["accuracy"] for b in per.values()) / n,
            "pass@k": {k: sum(b["pass@k"][k] for b in per.values()) / n for k in first["pass@k"]},
            "entropy": sum(b["mean_token_entropy"] or 0.0 for b in per.values()) / n,
            "mean_length": sum(b["mean_length"] for b in per.values()) / n,
            "right_plan": _mean([b["right_plan"] for b in per.values() if "right_plan" in b]),
            "benchmarks": per,
        }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
