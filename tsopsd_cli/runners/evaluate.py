"""`tsopsd eval`: sample n completions per problem, grade them, report avg@n, pass@k, maj@n and more.

Resumable (tsopsd_cli.rundir): with `--out DIR`, work happens in the hidden sibling `.DIR.partial/`. Each finished
chunk of problems (sampled and graded) is appended to its `samples.jsonl` and flushed to disk; a rerun of the same
command (same recipe, same checkpoint fingerprint) skips the problems already there. A signal stops it at the next
chunk or generation batch with exit 130, the finished chunks kept. When everything is done the directory gets
`report.json` and is renamed to DIR in one step. Sampling seeds derive from (seed, benchmark, first problem id of
the chunk), so a resumed eval samples exactly what an uninterrupted one would have. A resumed eval keeps the
samples of problems that have all of theirs (a damaged row, or a chunk cut by a kill, is sampled again).

Everything that can refuse the inputs (data, prompt templates, chat templates, the model's context) is checked
before the partial directory is made: a refusal leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from tsopsd_cli import engines, signals
from tsopsd_cli.checkpoint import check_out, fingerprint, inspect_checkpoint, load_checkpoint, load_tokenizer
from tsopsd_cli.core.metrics import benchmark_metrics
from tsopsd_cli.engines import check_context, context_length, encode_prompts, sampling_params
from tsopsd_cli.engines import require as require_engine
from tsopsd_cli.errors import DataError, Interrupted, storage
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import EvalRecipe
from tsopsd_cli.recipe_loading import recipe_to_yaml
from tsopsd_cli.report import json_safe
from tsopsd_cli.rundir import RunDir, run_key
from tsopsd_cli.tasks import right_plan
from tsopsd_cli.tasks.base import Problem, answer_text, apply_chat_template
from tsopsd_cli.tasks.benchmarks import custom_name, is_toy, load_benchmark, load_custom, template_text
from tsopsd_cli.tasks.grading import Grader, normalize

SAMPLES_FILE = "samples.jsonl"
SAMPLE_FIELDS = ("benchmark", "problem_id", "sample_index", "completion", "extracted", "answer", "correct",
                 "length", "finish_reason")  # what a row of samples.jsonl must hold to be kept by a resumed eval


def plan(recipe: EvalRecipe) -> dict[str, list[Problem]]:
    """Every benchmark's problems, loaded up front so that data errors come before any sampling. A custom set
    (`--data FILE`) is named after its file; one named like a benchmark that is asked for too is refused (it
    would replace that benchmark's problems under the same name)."""
    ev = recipe.eval
    template = template_text(ev.prompt_template)
    if ev.data is not None and custom_name(ev.data) in ev.benchmarks:
        raise DataError(f"--data {ev.data}: this set would be reported as {custom_name(ev.data)!r}, the benchmark "
                        f"also asked for (-b {custom_name(ev.data)}); rename the file or leave out the benchmark")
    sets = {name: load_benchmark(name, ev.data_dir, template, ev.limit, ev.toy_num_problems,
                                 recipe.rollout.seed) for name in ev.benchmarks}
    if ev.data is not None:
        sets[custom_name(ev.data)] = load_custom(ev.data, ev.question_field, ev.answer_field, template, ev.limit)
    return sets


def model_prompts(recipe: EvalRecipe, config: dict, tokenizer, sets: dict[str, list[Problem]]) -> dict[str, list]:
    """Each set's prompts as the model reads them (template, and chat template when on), checked against the
    model's context (engines.check_context, exit 2); {benchmark: [text per problem]}."""
    out = {}
    for bench, problems in sets.items():
        chat = recipe.eval.chat_template and not is_toy(bench)
        out[bench] = [prompt_text(tokenizer, p, chat) for p in problems]
        check_context([len(ids) for ids in encode_prompts(tokenizer, out[bench])], context_length(config),
                      f"prompts of {bench}")
    return out


def resumable_rows(run: RunDir, n: int) -> list[dict]:
    """The samples an unfinished eval keeps (the file is rewritten with them): rows with every field, of problems
    with all `n` of their samples. A damaged or foreign row, or the rest of a chunk a kill cut, is sampled again."""
    def whole(r: dict) -> bool:
        return all(k in r for k in SAMPLE_FIELDS) and isinstance(r["benchmark"], str) and \
            isinstance(r["problem_id"], str)

    counts = Counter((r["benchmark"], r["problem_id"]) for r in run.log.rows() if whole(r))
    return run.log.keep(lambda r: whole(r) and counts[(r["benchmark"], r["problem_id"])] >= n)


def open_engine(recipe: EvalRecipe, checkpoint: str):
    """(engine, tokenizer): an engine that samples from a transformers model gets one loaded here; the others
    load the weights themselves."""
    m, ro = recipe.model, recipe.rollout
    if engines.engine_class(ro.engine).needs_model:
        ld = load_checkpoint(checkpoint, m)
        model, tok = ld.model, ld.tokenizer
    else:
        model, tok = None, load_tokenizer(Path(checkpoint), m.trust_remote_code)
    return engines.open_engine(ro.engine, tok, model=model, checkpoint=checkpoint, model_section=m, rollout=ro), tok


def chunk_seed(seed: int, benchmark: str, first_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{benchmark}:{first_id}".encode()).digest()[:4], "big")


def done_ids(rows: list[dict], benchmark: str, n: int) -> set[str]:
    counts: dict[str, int] = {}
    for r in rows:
        if r["benchmark"] == benchmark:
            counts[r["problem_id"]] = counts.get(r["problem_id"], 0) + 1
    return {pid for pid, c in counts.items() if c >= n}


def run_eval(recipe: EvalRecipe, checkpoint: str, progress: Progress = NULL, restart: bool = False) -> dict:
    started = time.time()
    out, ev = recipe.output.out, recipe.eval
    check_out(out, recipe.output.overwrite, (checkpoint, ev.data, ev.data_dir))
    config, _ = inspect_checkpoint(checkpoint, allow_pickle=recipe.model.allow_pickle)
    require_engine(recipe.rollout.engine)
    sets = plan(recipe)
    prompts = model_prompts(recipe, config, load_tokenizer(Path(checkpoint), recipe.model.trust_remote_code), sets)
    fp = fingerprint(checkpoint)
    run = RunDir(out, key=run_key(recipe, fp), log_name=SAMPLES_FILE, resume=None, restart=restart,
                 what="eval", overwrite=recipe.output.overwrite) if out is not None else None
    try:
        if run is not None and run.complete:
            report = json.loads((run.path / "report.json").read_text())
            report["out"] = str(run.finish())
            return report
        rows = resumable_rows(run, recipe.rollout.num_generations) if run is not None and run.resumed else []
        if rows:
            progress.log(f"resuming the unfinished eval in {run.path} ({len(rows)} samples done)")
        engine, tokenizer = open_engine(recipe, checkpoint)
        try:
            report = _sample_and_grade(recipe, checkpoint, fp, sets, prompts, engine, tokenizer, rows, run,
                                       progress)
        finally:
            engine.close()
        report["seconds"] = round(time.time() - started, 3)
        if run is not None:
            with storage(f"writing the report into {run.path}", f"the samples are kept in {run.path}: free "
                                                                "space, then run the same command again"):
                (run.path / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
                (run.path / "recipe.yaml").write_text(recipe_to_yaml(recipe))
            report["out"] = str(run.finish(before_rename=lambda: signals.check("finishing")))
        return report
    except Interrupted as e:
        where = f"; the finished chunks are in {run.path}: run the same command again to continue" if run else ""
        raise Interrupted(f"{e}{where}") from None
    except BaseException:
        if run is not None and not run.complete and not run.log.rows():
            run.close(discard=True)  # no sample stored: nothing a rerun could continue (a refusal leaves nothing)
        raise
    finally:
        if run is not None:
            run.close()


def prompt_text(tokenizer, problem: Problem, chat: bool) -> str:
    """The text the model reads for `problem`: its rendered template, as one user turn of the chat template when
    `chat` (tasks.base.apply_chat_template, the one chat rendering of every command)."""
    return apply_chat_template(tokenizer, problem.prompt) if chat else problem.prompt


def _sample_and_grade(recipe, checkpoint, fp, sets, prompts, engine, tokenizer, rows, run, progress) -> dict:
    params = sampling_params(recipe.rollout)
    n = params.num_generations
    ev = recipe.eval
    total = sum(len(p) for p in sets.values()) * n
    with Grader(workers=ev.grader_workers, timeout=ev.grader_timeout) as grader, \
            progress.task("eval", total=total) as advance:
        for bench, problems in sets.items():
            done = done_ids(rows, bench, n)
            advance(len([p for p in problems if p.id in done]) * n)
            text_of = dict(zip((p.id for p in problems), prompts[bench]))
            for s in range(0, len(problems), ev.chunk_problems):
                chunk = problems[s:s + ev.chunk_problems]
                todo = [p for p in chunk if p.id not in done]
                if not todo:
                    continue
                signals.check("eval")
                signals.fault_point("eval-chunk")
                seeded = dataclasses.replace(params, seed=chunk_seed(params.seed, bench, chunk[0].id))
                comps = engine.generate(encode_prompts(tokenizer, [text_of[p.id] for p in todo]), seeded)
                grades = grader.grade_many([(c.text, todo[c.prompt_index].answer) for c in comps])
                new = []
                for c, g in zip(comps, grades):
                    p = todo[c.prompt_index]
                    new.append({"benchmark": bench, "problem_id": p.id, "sample_index": c.sample_index,
                                "completion": c.text, "extracted": g.extracted, "answer": p.answer,
                                "correct": g.correct, "timed_out": g.timed_out, "length": len(c.token_ids),
                                "finish_reason": c.finish_reason, "entropy": c.mean_entropy})
                rows.extend(new)
                if run is not None:
                    with storage(f"writing samples to {run.log.path}", f"the finished chunks are kept in "
                                                                       f"{run.path}: free space, then run the same "
                                                                       "command again"):
                        run.log.append(new, durable=True)
                advance(len(new))
        timeouts = grader.timeouts
    report = summarize(recipe, checkpoint, fp, sets, rows, n)
    report["grader_timeouts"] = timeouts
    # each benchmark's first prompt exactly as the model read it (template, and chat template when on)
    report["first_prompts"] = {bench: texts[0] for bench, texts in prompts.items() if texts}
    return report


def summarize(recipe: EvalRecipe, checkpoint: str, fp: str, sets: dict[str, list[Problem]], rows: list[dict],
              n: int) -> dict:
    per_bench = {}
    for bench, problems in sets.items():
        by_id: dict[str, list[dict]] = {p.id: [] for p in problems}
        problem = {p.id: p for p in problems}
        for r in rows:
            if r["benchmark"] == bench and r["problem_id"] in by_id:
                by_id[r["problem_id"]].append({**r, "answer_key": normalize(r["extracted"]) if r["extracted"] else None,
                                               "right_plan": right_plan(problem[r["problem_id"]], r["completion"])})
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

    check_out(out, overwrite, (path,))
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("completion"), str) or r.get("answer") is None:
            raise DataError(f"{path}:{i}: needs a string 'completion' and an 'answer'")
    pairs = [(r["completion"], answer_text(r["answer"])) for r in rows]
    with Grader(workers=workers, timeout=timeout) as grader, progress.task("grading", total=len(pairs)) as adv:
        grades = []
        for s in range(0, len(pairs), 16):
            signals.check("grading")  # nothing to keep: the same command grades again from the start
            signals.fault_point("grade-chunk")
            grades += grader.grade_many(pairs[s:s + 16])
            adv(len(pairs[s:s + 16]))
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
