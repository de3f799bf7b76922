"""`tsopsd eval`: sample n completions per problem, grade them, report avg@n, pass@k, maj@n and more.

Resumable: with `--out DIR`, work happens in the hidden sibling `.DIR.partial/`. Each finished chunk of problems
(sampled and graded) is appended to its `samples.jsonl` and flushed; a rerun of the same command (same recipe,
same checkpoint fingerprint) skips the problems already there. When everything is done the directory gets
`report.json` and is renamed to DIR in one step. Sampling seeds derive from (seed, benchmark, first problem id of
the chunk), so a resumed eval samples exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from tsopsd_cli.checkpoint import (check_out, fingerprint, inspect_checkpoint, load_checkpoint, load_tokenizer,
                                   move_into_place)
from tsopsd_cli.core.metrics import benchmark_metrics
from tsopsd_cli.engines import encode_prompts, make_engine, sampling_params
from tsopsd_cli.errors import OutputExistsError
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import EvalRecipe, recipe_to_yaml
from tsopsd_cli.report import json_safe
from tsopsd_cli.tasks.base import Problem, answer_text
from tsopsd_cli.tasks.benchmarks import load_benchmark, load_custom, template_text
from tsopsd_cli.tasks.grading import Grader, normalize

STATE_FILE = "state.json"
SAMPLES_FILE = "samples.jsonl"


def plan(recipe: EvalRecipe) -> dict[str, list[Problem]]:
    """Every benchmark's problems, loaded up front so that data errors come before any sampling."""
    ev = recipe.eval
    template = template_text(ev.prompt_template)
    sets = {name: load_benchmark(name, ev.data_dir, template, ev.limit, ev.toy_num_problems,
                                 recipe.rollout.seed) for name in ev.benchmarks}
    if ev.data is not None:
        custom = load_custom(ev.data, ev.question_field, ev.answer_field, template, ev.limit)
        sets[custom[0].id.rsplit("-", 1)[0]] = custom
    return sets


def open_engine(recipe: EvalRecipe, checkpoint: str):
    """(engine, tokenizer, fingerprint); vLLM loads the weights itself, hf through transformers."""
    m, ro = recipe.model, recipe.rollout
    if ro.engine == "vllm":
        inspect_checkpoint(checkpoint, allow_pickle=m.allow_pickle)
        from tsopsd_cli.engines.vllm import VLLMEngine

        tok = load_tokenizer(Path(checkpoint), m.trust_remote_code)
        engine = VLLMEngine(checkpoint, tok, ro.vllm, dtype=m.dtype, seed=ro.seed,
                            trust_remote_code=m.trust_remote_code)
        return engine, tok, fingerprint(checkpoint)
    ld = load_checkpoint(checkpoint, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code,
                         allow_pickle=m.allow_pickle, attn_implementation=m.attn_implementation)
    return make_engine("hf", ld.model, ld.tokenizer, ro.batch_size, m.lean), ld.tokenizer, ld.fingerprint


def run_key(recipe: EvalRecipe, fp: str) -> str:
    """What must match for a partial eval to be resumed: the recipe (less output settings) and the weights."""
    body = recipe.model_dump(mode="json")
    body.pop("output", None)
    return hashlib.sha256(json.dumps([body, fp], sort_keys=True).encode()).hexdigest()[:16]


def chunk_seed(seed: int, benchmark: str, first_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{benchmark}:{first_id}".encode()).digest()[:4], "big")


class SampleStore:
    """samples.jsonl in the partial directory (or only in memory without --out)."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        self.rows: list[dict] = []
        if directory is not None and (directory / SAMPLES_FILE).is_file():
            with open(directory / SAMPLES_FILE) as fh:
                for line in fh:
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line cut by a kill: drop it and everything after
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.directory / (SAMPLES_FILE + ".tmp")
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.rows)
        os.replace(tmp, self.directory / SAMPLES_FILE)

    def done(self, benchmark: str, n: int) -> set[str]:
        counts: dict[str, int] = {}
        for r in self.rows:
            if r["benchmark"] == benchmark:
                counts[r["problem_id"]] = counts.get(r["problem_id"], 0) + 1
        return {pid for pid, c in counts.items() if c >= n}

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        if self.directory is not None:
            with open(self.directory / SAMPLES_FILE, "a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
                fh.flush()
                os.fsync(fh.fileno())


def prepare_partial(out: Path | None, overwrite: bool, key: str, restart: bool, progress: Progress) -> Path | None:
    if out is None:
        return None
    check_out(out, overwrite)
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        state = _read_state(partial)
        if restart:
            shutil.rmtree(partial)
        elif state.get("key") != key:
            raise OutputExistsError(f"{partial}: an unfinished eval with a different recipe or checkpoint is "
                                    "there (pass --restart to discard it)")
        else:
            progress.log(f"resuming the unfinished eval in {partial}")
    partial.mkdir(parents=True, exist_ok=True)
    (partial / STATE_FILE).write_text(json.dumps({"key": key}))
    return partial


def _read_state(partial: Path) -> dict:
    try:
        return json.loads((partial / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def run_eval(recipe: EvalRecipe, checkpoint: str, progress: Progress = NULL, restart: bool = False) -> dict:
    started = time.time()
    out = recipe.output.out
    check_out(out, recipe.output.overwrite)
    inspect_checkpoint(checkpoint, allow_pickle=recipe.model.allow_pickle)
    sets = plan(recipe)
    engine, tokenizer, fp = open_engine(recipe, checkpoint)
    partial = prepare_partial(out, recipe.output.overwrite, run_key(recipe, fp), restart, progress)
    store = SampleStore(partial)
    params = sampling_params(recipe.rollout)
    n = params.num_generations
    ev = recipe.eval
    total = sum(len(p) for p in sets.values()) * n
    with Grader(workers=ev.grader_workers, timeout=ev.grader_timeout) as grader, \
            progress.task("eval", total=total) as advance:
        for bench, problems in sets.items():
            done = store.done(bench, n)
            advance(len([p for p in problems if p.id in done]) * n)
            chat = ev.chat_template and bench != "toy"
            for s in range(0, len(problems), ev.chunk_problems):
                chunk = problems[s:s + ev.chunk_problems]
                todo = [p for p in chunk if p.id not in done]
                if not todo:
                    continue
                seeded = dataclasses.replace(params, seed=chunk_seed(params.seed, bench, chunk[0].id))
                comps = engine.generate(encode_prompts(tokenizer, [p.prompt for p in todo], chat), seeded)
                grades = grader.grade_many([(c.text, todo[c.prompt_index].answer) for c in comps])
                rows = []
                for c, g in zip(comps, grades):
                    p = todo[c.prompt_index]
                    rows.append({"benchmark": bench, "problem_id": p.id, "sample_index": c.sample_index,
                                 "completion": c.text, "extracted": g.extracted, "answer": p.answer,
                                 "correct": g.correct, "timed_out": g.timed_out, "length": len(c.token_ids),
                                 "finish_reason": c.finish_reason, "entropy": c.mean_entropy})
                store.add(rows)
                advance(len(rows))
        timeouts = grader.timeouts
    report = summarize(recipe, checkpoint, fp, sets, store.rows, n)
    report["grader_timeouts"] = timeouts
    report["seconds"] = round(time.time() - started, 3)
    if partial is not None:
        (partial / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
        (partial / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (partial / STATE_FILE).unlink()
        move_into_place(partial, out)
        report["out"] = str(out)
    return report


def summarize(recipe: EvalRecipe, checkpoint: str, fp: str, sets: dict[str, list[Problem]], rows: list[dict],
              n: int) -> dict:
    per_bench = {}
    for bench, problems in sets.items():
        by_id: dict[str, list[dict]] = {p.id: [] for p in problems}
        for r in rows:
            if r["benchmark"] == bench and r["problem_id"] in by_id:
                by_id[r["problem_id"]].append({**r, "answer_key": normalize(r["extracted"])
                                               if r["extracted"] else None})
        groups = [sorted(g, key=lambda r: r["sample_index"])[:n] for g in by_id.values()]
        per_bench[bench] = benchmark_metrics(groups)
    keys = ["accuracy", f"avg@{n}", f"maj@{n}", "mean_length", "truncation_rate"]
    macro = {k: sum(b[k] for b in per_bench.values()) / len(per_bench) for k in keys}
    macro["pass@k"] = {k: sum(b["pass@k"][k] for b in per_bench.values()) / len(per_bench)
                       for k in next(iter(per_bench.values()))["pass@k"]}
    return {"command": "eval", "checkpoint": str(checkpoint), "fingerprint": fp, "engine": recipe.rollout.engine,
            "num_generations": n, "temperature": recipe.rollout.temperature, "benchmarks": per_bench,
            "macro": macro, "recipe": recipe.model_dump(mode="json")}


def regrade(path: Path, out: Path | None, overwrite: bool, workers: int, timeout: float,
            progress: Progress = NULL) -> dict:
    """`tsopsd eval grade FILE.jsonl`: re-grade completions (fields `completion`, `answer`)."""
    from tsopsd_cli.checkpoint import atomic_dir
    from tsopsd_cli.errors import DataError
    from tsopsd_cli.tasks import read_jsonl

    check_out(out, overwrite)
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("completion"), str) or r.get("answer") is None:
            raise DataError(f"{path}:{i}: needs a string 'completion' and an 'answer'")
    pairs = [(r["completion"], answer_text(r["answer"])) for r in rows]
    with Grader(workers=workers, timeout=timeout) as grader, progress.task("grading", total=len(pairs)) as adv:
        grades = []
        for s in range(0, len(pairs), 64):
            grades += grader.grade_many(pairs[s:s + 64])
            adv(len(pairs[s:s + 64]))
        timeouts = grader.timeouts
    result = {"file": str(path), "n": len(grades), "correct": sum(g.correct for g in grades),
              "accuracy": sum(g.correct for g in grades) / len(grades), "timeouts": timeouts}
    if out is not None:
        with atomic_dir(out, overwrite) as tmp:
            with open(tmp / "graded.jsonl", "w") as fh:
                for r, g in zip(rows, grades):
                    fh.write(json.dumps({**r, "extracted": g.extracted, "correct": g.correct,
                                         "timed_out": g.timed_out}) + "\n")
            (tmp / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        result["out"] = str(out)
    return result
