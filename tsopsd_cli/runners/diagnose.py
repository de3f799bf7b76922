"""`tsopsd diagnose`: entropy, sharpness, temperature sensitivity and top-k statistics of a checkpoint, on its own
rollouts (sampled mode) or on given (prompt, completion) pairs (teacher-forced mode), optionally against a
reference checkpoint (KL both ways, top-1 agreement, Jaccard@k, per-layer CKA and cosine).

Every statistic covers completion tokens only and comes from a chunked pass over hidden states (core.stats).
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from pathlib import Path

import torch

from tsopsd_cli.analysis import clip_to_rows, mean_or_nan, shared_rows, summarize, token_pass
from tsopsd_cli.checkpoint import Loaded, atomic_dir, check_checkpoint, check_out, load_checkpoint
from tsopsd_cli.core import stats as S
from tsopsd_cli.errors import CheckpointError, DataError
from tsopsd_cli.modeling import check_head_matches
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.report import json_safe, pyplot
from tsopsd_cli.recipe import DiagnoseRecipe
from tsopsd_cli.recipe_loading import recipe_to_yaml


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def texts_sequences(tokenizer, path: Path, context: int | None = None) -> list[tuple[list[int], list[int]]]:
    """The (prompt, completion) token ids of a --texts file; each pair must fit the model's `context`."""
    from tsopsd_cli.engines import check_context
    from tsopsd_cli.tasks import read_jsonl

    seqs = []
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise DataError(f"{path}:{n}: needs string fields 'prompt' and 'completion'")
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        if not p or not c:
            raise DataError(f"{path}:{n}: empty prompt or completion")
        seqs.append((p, c))
    check_context([len(p) + len(c) for p, c in seqs], context, f"prompt and completion pairs of {path}", whole=True)
    return seqs


def diagnose_prompts(recipe: DiagnoseRecipe, checkpoint: str, config: dict) -> list:
    """The prompts to sample, read before any model (a data error is one line, before any progress line) and
    checked against the model's context (engines.check_context); the checkpoint's tokenizer is read for its chat
    template and the prompts' lengths."""
    from tsopsd_cli.checkpoint import load_tokenizer
    from tsopsd_cli.engines import check_context, context_length, encode_prompts
    from tsopsd_cli.tasks import load_problems

    tok = load_tokenizer(Path(checkpoint), recipe.model.trust_remote_code)
    problems = load_problems(recipe.data, tok if getattr(recipe.data, "chat_template", False) else None,
                             limit=recipe.diagnose.num_prompts)
    if not problems:
        raise DataError("the prompt source gave no problems")
    check_context([len(ids) for ids in encode_prompts(tok, [p.prompt for p in problems])], context_length(config),
                  "prompts")
    return problems


def sample_sequences(recipe: DiagnoseRecipe, loaded: Loaded, problems: list, progress: Progress):
    """Rollouts from the checkpoint on `problems`; returns sequences, the rollout summary (diversity, accuracy), the
    toy world's decision points (None on other checkpoints or prompt sources) and the first prompt as tokenized."""
    from tsopsd_cli.engines import encode_prompts, open_engine, sampling_params
    from tsopsd_cli.tasks import decision_positions
    from tsopsd_cli.tasks.grading import Grader, extract_answer
    from tsopsd_cli.tasks.toy import is_toy_tokenizer

    params = sampling_params(recipe.rollout)
    engine = open_engine(recipe.rollout.engine, loaded.tokenizer, model=loaded.model, checkpoint=loaded.path,
                         model_section=recipe.model, rollout=recipe.rollout)
    progress.log(f"sampling {len(problems)} prompts x {params.num_generations} (up to {params.max_new_tokens} "
                 f"new tokens each); first prompt: {problems[0].prompt[:200]!r}")
    try:
        with progress.task("sampling", total=len(problems) * params.num_generations) as advance:
            comps = engine.generate(encode_prompts(loaded.tokenizer, [p.prompt for p in problems]), params,
                                    progress=advance)
    finally:
        engine.close()  # the scoring passes that follow use the transformers model
    kept = [c for c in comps if c.token_ids]
    seqs = [(c.prompt_ids, c.token_ids) for c in kept]
    # the decision points are the toy world's plan letter, read with its character tokenizer
    marks = [decision_positions(problems[c.prompt_index], c.token_ids) for c in kept] \
        if is_toy_tokenizer(loaded.tokenizer) else []
    by_prompt: dict[int, list] = {}
    for c in comps:
        by_prompt.setdefault(c.prompt_index, []).append(c)
    answers = [[a for a in (extract_answer(c.text) for c in cs) if a] for cs in by_prompt.values()]
    summary = {
        "num_prompts": len(problems),
        "num_generations": params.num_generations,
        "temperature": params.temperature,
        "distinct_completions": mean_or_nan([len({c.text for c in cs}) for cs in by_prompt.values()]),
        "distinct_answers": distinct_answers([[c.text for c in cs] for cs in by_prompt.values()]),
        "answered": mean_or_nan([len(a) / len(cs) for a, cs in zip(answers, by_prompt.values())]),
        "mean_length": mean_or_nan([len(c.token_ids) for c in comps]),
        "truncation_rate": mean_or_nan([c.finish_reason == "length" for c in comps]),
    }
    graded = [(c.text, problems[c.prompt_index].answer) for c in comps if problems[c.prompt_index].answer]
    if graded:
        with Grader() as grader:
            grades = grader.grade_many(graded)
        summary["accuracy"] = mean_or_nan([g.correct for g in grades])
        summary["graded"] = len(grades)
    return seqs, summary, (marks if marks and all(m is not None for m in marks) else None), problems[0].prompt


def distinct_answers(groups: list[list[str]]) -> float:
    """Mean over prompts of the number of distinct final answers among its completions (texts). A completion
    without a final answer adds none: "no answer" is not an answer, so a prompt whose samples all lack one
    counts 0."""
    from tsopsd_cli.tasks.grading import extract_answer

    return mean_or_nan([len({a for a in (extract_answer(t) for t in texts) if a}) for texts in groups])


def decision_split(entropy: torch.Tensor, seqs, marks: list[list[int]]) -> dict:
    """Mean token entropy at the task's decision points vs at every other completion token.  entropy: [N] in pack
    order (sequence by sequence)."""
    mask = torch.zeros(entropy.numel(), dtype=torch.bool)
    offset = 0
    for (_, c), pos in zip(seqs, marks, strict=True):
        for p in pos:
            if p < len(c):
                mask[offset + p] = True
        offset += len(c)
    e = entropy.double()
    at, other = e[mask], e[~mask]
    return {"entropy": float(at.mean()) if at.numel() else None,
            "other_entropy": float(other.mean()) if other.numel() else None,
            "tokens": int(at.numel()), "other_tokens": int(other.numel())}


def run_diagnose(recipe: DiagnoseRecipe, checkpoint: str, progress: Progress = NULL) -> dict:
    out = recipe.output.out
    d = recipe.diagnose
    check_out(out, recipe.output.overwrite, (checkpoint, d.reference, d.texts, getattr(recipe.data, "path", None),
                                             getattr(recipe.data, "data_dir", None)))
    started = time.time()
    problems, texts = check_inputs(recipe, checkpoint, progress)
    progress.log(f"loading {checkpoint}")
    loaded = load_checkpoint(checkpoint, recipe.model)
    ref, vocab_rows, rows = load_reference(recipe, loaded, progress)
    check_head_matches(loaded.model, loaded.tokenizer)
    rollout_summary = marks = first_prompt = None
    if texts is not None:
        seqs = texts
    else:
        seqs, rollout_summary, marks, first_prompt = sample_sequences(recipe, loaded, problems, progress)
        if not seqs:
            raise DataError("every sampled completion was empty; nothing to measure")
    dropped = 0
    if rows is not None:
        before = len(seqs)
        seqs, dropped = clip_to_rows(seqs, rows)
        if len(seqs) != before:
            marks = None
        if not seqs:
            raise DataError(f"every completion starts with a token id >= {rows}, a row the reference lacks")
    progress.log(f"statistics over {sum(len(c) for _, c in seqs)} completion tokens")
    st, positions, layer_sim = token_pass(seqs, loaded.model, loaded.tokenizer.pad_token_id, loaded.device,
                                          d.temperatures, d.topk, d.chunk_size, d.batch_size,
                                          ref.model if ref else None, progress, rows)
    report = {"command": "diagnose", "checkpoint": str(checkpoint), "fingerprint": loaded.fingerprint,
              "mode": "texts" if d.texts is not None else "sampled", "num_sequences": len(seqs)}
    if first_prompt is not None:
        report["first_prompt"] = first_prompt
    report.update(summarize(st, positions, d.entropy_thresholds, d.top_entropy_fraction, d.histogram_bins))
    if marks is not None:  # the task marks decision points (the toy world): entropy there vs elsewhere
        report["decision_points"] = decision_split(st.entropy, seqs, marks)
    if rollout_summary is not None:
        report["rollouts"] = rollout_summary
    if ref is not None:
        sim = layer_sim.result() if layer_sim.count else {"cka": [], "cosine": [], "cka_tokens": 0}
        report["reference"].update({"checkpoint": str(d.reference), "fingerprint": ref.fingerprint, **sim})
        if rows is not None:
            report["reference"]["vocab_rows"] = {"checkpoint": vocab_rows[0], "reference": vocab_rows[1],
                                                 "compared": rows, "tokens_dropped": dropped}
    report["seconds"] = round(time.time() - started, 3)
    report["recipe"] = recipe.model_dump(mode="json")
    if out is not None:
        with atomic_dir(out, recipe.output.overwrite) as tmp:
            write_outputs(tmp, report, st, positions, recipe)
        report["out"] = str(out)
    return report


def check_inputs(recipe: DiagnoseRecipe, checkpoint: str, progress: Progress) -> tuple[list | None, list | None]:
    """What can be checked without loading a model, before any progress line (bad input is one line on stderr):
    the engine, the checkpoints, and against the model's context the prompts (sampled mode) or the texts file's
    sequences (teacher-forced mode); returns (the prompts or None, the texts' token ids or None)."""
    d = recipe.diagnose
    if d.texts is None:
        from tsopsd_cli.engines import require

        require(recipe.rollout.engine)
    from tsopsd_cli.tasks import require_file

    config = check_checkpoint(checkpoint, recipe.model)
    if d.reference is not None:
        check_checkpoint(d.reference, recipe.model)
    if d.texts is not None:
        from tsopsd_cli.checkpoint import load_tokenizer
        from tsopsd_cli.engines import context_length

        tok = load_tokenizer(Path(checkpoint), recipe.model.trust_remote_code)
        return None, texts_sequences(tok, require_file(d.texts), context_length(config))
    from tsopsd_cli.tasks import source_name

    problems = diagnose_prompts(recipe, checkpoint, config)
    progress.log(f"prompts: {len(problems)} from {source_name(recipe.data)} ({recipe.data.type})")
    return problems, None


def load_reference(recipe: DiagnoseRecipe, loaded: Loaded, progress: Progress):
    """The reference checkpoint (None without one), checked against the checkpoint: (reference, (the checkpoint's
    LM-head rows, the reference's, the rows both have) or None, the rows compared when the heads differ or None)."""
    d = recipe.diagnose
    if d.reference is None:
        return None, None, None
    progress.log(f"loading the reference {d.reference}")
    ref = load_checkpoint(d.reference, recipe.model)
    if not same_tokenizer(loaded.tokenizer, ref.tokenizer):
        raise CheckpointError(f"{d.reference}: the reference has a different tokenizer; "
                              "token-level comparisons need the same vocabulary")
    vocab_rows = shared_rows(loaded.model, ref.model)
    rows = None
    if vocab_rows[0] != vocab_rows[1]:
        rows = vocab_rows[2]
        progress.log(f"the LM heads have {vocab_rows[0]} and {vocab_rows[1]} rows (the same tokenizer, padded "
                     f"differently): every statistic is over the {rows} rows both have")
    return ref, vocab_rows, rows


def write_outputs(directory: Path, report: dict, st: S.TokenStats, positions: torch.Tensor, recipe) -> None:
    if recipe.output.plots:
        report["plots"] = write_plots(directory, report)
    (directory / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    (directory / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    counts = Counter(positions.tolist())
    cols = {"entropy": st.entropy, "top1_prob": st.top1_prob}
    if st.kl_forward is not None:
        cols.update({"kl_forward": st.kl_forward, "kl_reverse": st.kl_reverse, "top1_agreement": st.top1_agree})
    means = {name: S.per_position_mean(v, positions)[0] for name, v in cols.items()}
    with open(directory / "per_position.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["position", "count", *cols])
        for pos in range(len(means["entropy"])):
            w.writerow([pos, counts.get(pos, 0), *(f"{means[c][pos]:.6g}" for c in cols)])


def write_plots(directory: Path, report: dict) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []

    def histogram(ax):
        h = report["entropy"]["histogram"]
        ax.stairs(h["counts"], h["edges"], fill=True)

    def by_temperature(ax):
        te = report["temperature_entropy"]
        ax.plot([float(t) for t in te], list(te.values()), marker="o")

    plots = [("entropy_histogram.png", histogram, "token entropy (nats)", "tokens"),
             ("entropy_by_position.png", lambda ax: ax.plot(report["per_position"]["entropy"]),
              "completion position", "mean entropy (nats)"),
             ("entropy_vs_temperature.png", by_temperature, "temperature", "mean entropy (nats)")]
    files = []
    for name, draw, xlabel, ylabel in plots:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        draw(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        files.append(name)
        plt.close(fig)
    return files
