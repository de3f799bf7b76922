"""Validation during training (rl, reheat): the eval metrics on a fixed problem set, with fixed seeds so that
the numbers of different steps and runs are comparable."""

from __future__ import annotations

import torch

from tsopsd_cli.core.metrics import benchmark_metrics
from tsopsd_cli.engines import SamplingParams, encode_prompts
from tsopsd_cli.engines.hf import HFEngine
from tsopsd_cli.tasks.benchmarks import load_benchmark, template_text
from tsopsd_cli.tasks.grading import Grader, normalize


class Validator:
    def __init__(self, section, tokenizer, grader_timeout: float = 5.0, batch_size: int = 128, lean: bool = True):
        template = template_text(section.prompt_template)
        self.sets = {name: load_benchmark(name, section.data_dir, template, section.limit,
                                          toy_num=section.limit or 200, toy_seed=0) for name in section.benchmarks}
        self.tokenizer = tokenizer
        self.section = section
        self.grader_timeout = grader_timeout
        self.batch_size = batch_size
        self.lean = lean

    @torch.no_grad()
    def run(self, model) -> dict:
        """{'accuracy', 'pass@k', 'entropy', 'mean_length', per-benchmark 'benchmarks'} (macro over benchmarks)."""
        v = self.section
        engine = HFEngine(model, self.tokenizer, batch_size=self.batch_size, lean=self.lean)
        per = {}
        with Grader(workers=1, timeout=self.grader_timeout) as grader:
            for name, problems in self.sets.items():
                params = SamplingParams(num_generations=v.num_generations, temperature=v.temperature,
                                        max_new_tokens=v.max_new_tokens,
                                        row_seeds=tuple(range(len(problems))))
                comps = engine.generate(encode_prompts(self.tokenizer, [p.prompt for p in problems]), params)
                grades = grader.grade_many([(c.text, problems[c.prompt_index].answer) for c in comps])
                groups: list[list[dict]] = [[] for _ in problems]
                for c, g in zip(comps, grades):
                    groups[c.prompt_index].append({
                        "correct": g.correct, "answer_key": normalize(g.extracted) if g.extracted else None,
                        "length": len(c.token_ids), "finish_reason": c.finish_reason, "entropy": c.mean_entropy})
                per[name] = benchmark_metrics(groups)
        n = len(per)
        first = next(iter(per.values()))
        return {
            "accuracy": sum(b["accuracy"] for b in per.values()) / n,
            "pass@k": {k: sum(b["pass@k"][k] for b in per.values()) / n for k in first["pass@k"]},
            "entropy": sum(b["mean_token_entropy"] or 0.0 for b in per.values()) / n,
            "mean_length": sum(b["mean_length"] for b in per.values()) / n,
            "benchmarks": per,
        }
