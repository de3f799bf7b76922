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

from tsopsd_cli.checkpoint import Loaded, atomic_dir, check_out, load_checkpoint
from tsopsd_cli.core import stats as S
from tsopsd_cli.core.representation import LayerSimilarity
from tsopsd_cli.errors import CheckpointError, DataError
from tsopsd_cli.modeling import check_head_matches, completion_hidden, decoder_and_head, pack
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.report import json_safe, pyplot
from tsopsd_cli.recipe import DiagnoseRecipe, recipe_to_yaml


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def texts_sequences(tokenizer, path: Path) -> list[tuple[list[int], list[int]]]:
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
    return seqs


def sample_sequences(recipe: DiagnoseRecipe, loaded: Loaded, progress: Progress):
    """Rollouts from the checkpoint; returns sequences, the rollout summary (diversity, accuracy), the toy world's
    decision points (None on other checkpoints or prompt sources) and the first prompt as tokenized."""
    from tsopsd_cli.engines import encode_prompts, open_engine, sampling_params
    from tsopsd_cli.tasks import decision_positions, load_problems
    from tsopsd_cli.tasks.grading import Grader, extract_answer
    from tsopsd_cli.tasks.toy import is_toy_tokenizer

    from tsopsd_cli.tasks import source_name

    progress.log(f"loading prompts: {source_name(recipe.data)} ({recipe.data.type})")
    problems = load_problems(recipe.data, loaded.tokenizer, limit=recipe.diagnose.num_prompts)
    if not problems:
        raise DataError("the prompt source gave no problems")
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
        "distinct_completions": _mean([len({c.text for c in cs}) for cs in by_prompt.values()]),
        "distinct_answers": distinct_answers([[c.text for c in cs] for cs in by_prompt.values()]),
        "answered": _mean([len(a) / len(cs) for a, cs in zip(answers, by_prompt.values())]),
        "mean_length": _mean([len(c.token_ids) for c in comps]),
        "truncation_rate": _mean([c.finish_reason == "length" for c in comps]),
    }
    graded = [(c.text, problems[c.prompt_index].answer) for c in comps if problems[c.prompt_index].answer]
    if graded:
        with Grader() as grader:
            grades = grader.grade_many(graded)
        summary["accuracy"] = _mean([g.correct for g in grades])
        summary["graded"] = len(grades)
    return seqs, summary, (marks if marks and all(m is not None for m in marks) else None), problems[0].prompt


def distinct_answers(groups: list[list[str]]) -> float:
    """Mean over prompts of the number of distinct final answers among its completions (texts). A completion
    without a final answer adds none: "no answer" is not an answer, so a prompt whose samples all lack one
    counts 0."""
    from tsopsd_cli.tasks.grading import extract_answer

    return _mean([len({a for a in (extract_answer(t) for t in texts) if a}) for texts in groups])


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


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs)) / len(xs) if xs else float("nan")


def shared_rows(model, ref_model) -> tuple[int, int, int]:
    """(rows of the checkpoint's LM head, rows of the reference's, rows compared): two checkpoints of one
    tokenizer may pad their vocabularies differently (Qwen: 151,936 or 152,064 rows for 151,669 ids); they are
    compared over the rows both have, which cover every id of the tokenizer."""
    a = decoder_and_head(model)[1].weight.shape[0]
    b = decoder_and_head(ref_model)[1].weight.shape[0]
    return a, b, min(a, b)


def _first_rows(head, n: int):
    return lambda h: head(h)[..., :n]  # [c, V] -> [c, n]


def clip_to_rows(seqs, rows: int):
    """Completions cut before the first token id >= `rows` (a padding row the other model lacks); returns the
    kept sequences and the number of completion tokens dropped."""
    out, dropped = [], 0
    for p, c in seqs:
        cut = next((i for i, t in enumerate(c) if t >= rows), len(c))
        dropped += len(c) - cut
        if cut:
            out.append((p, c[:cut]))
    return out, dropped


def token_pass(seqs, model, pad_id: int, device, temperatures, topk, chunk_size: int, batch_size: int,
               ref_model=None, progress: Progress = NULL, rows: int | None = None):
    """Chunked statistics over all completion tokens of `seqs` [(prompt ids, completion ids)] under `model`
    (against `ref_model` when given); `rows`: use only the first `rows` logits of each head (shared_rows).
    Returns (TokenStats, positions [N], LayerSimilarity or None)."""
    _, head = decoder_and_head(model)
    ref_head = decoder_and_head(ref_model)[1] if ref_model is not None else None
    if rows is not None:
        head = _first_rows(head, rows)
        ref_head = _first_rows(ref_head, rows) if ref_head is not None else None
    layer_sim = LayerSimilarity() if ref_model is not None else None
    parts, positions = [], []
    with progress.task("statistics", total=len(seqs)) as advance, torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s:s + batch_size]
            batch = pack(chunk, pad_id, device)
            hidden, layers = completion_hidden(model, batch, all_layers=ref_model is not None)
            ref_hidden = None
            if ref_model is not None:
                ref_hidden, ref_layers = completion_hidden(ref_model, batch, all_layers=True)
                if len(layers) == len(ref_layers):
                    layer_sim.add(layers, ref_layers)
            parts.append(S.chunked_token_stats(hidden, head, temperatures, topk, chunk_size,
                                               target=batch.targets, ref_hidden=ref_hidden, ref_head=ref_head))
            positions.append(batch.completion_pos)
            advance(len(chunk))
    return S._cat(parts), torch.cat(positions), layer_sim


def summarize(st: S.TokenStats, positions: torch.Tensor, entropy_thresholds=(0.1, 0.5, 1.0),
              top_entropy_fraction: float = 0.2, histogram_bins: int = 20) -> dict:
    ent = st.entropy
    report = {
        "num_tokens": int(ent.numel()),
        "entropy": {
            "mean": float(ent.double().mean()),
            "std": float(ent.double().std()) if ent.numel() > 1 else 0.0,
            "median": float(ent.double().median()),
            "quantiles": S.quantiles(ent),
            "above": {str(t): float((ent > t).double().mean()) for t in entropy_thresholds},
            "top_fraction": top_entropy_fraction,
            "top_fraction_share": S.top_fraction_share(ent, top_entropy_fraction),
            "histogram": S.histogram(ent, histogram_bins),
        },
        "top1_prob": {"mean": float(st.top1_prob.double().mean()), "median": float(st.top1_prob.double().median())},
        "topk_mass": {str(k): float(v.double().mean()) for k, v in st.topk_mass.items()},
        "effective_support": {"mean": float(ent.double().exp().mean()),
                              "median": float(ent.double().exp().median())},
        "temperature_entropy": {f"{t:g}": float(v.double().mean()) for t, v in st.entropy_at.items()},
        "nll": float(-st.token_logprob.double().mean()) if st.token_logprob is not None else None,
    }
    means, counts = S.per_position_mean(ent, positions)
    report["per_position"] = {"entropy": means, "count": counts}
    if st.kl_forward is not None:
        report["reference"] = {
            "kl_forward": float(st.kl_forward.double().mean()),
            "kl_reverse": float(st.kl_reverse.double().mean()),
            "top1_agreement": float(st.top1_agree.double().mean()),
            "topk_jaccard": {str(k): float(v.double().mean()) for k, v in st.jaccard.items()},
        }
    return report


def compare_models(model, reference, pad_id: int, device, seqs, temperatures: list[float], topk: list[int],
                   chunk_size: int = 256, batch_size: int = 16) -> dict:
    """The statistics of `model` against `reference` on the same tokens (reheat's before/after summary): entropy
    at each of `temperatures` (keys formatted with :g), top-1 probability, top-k mass, KL both ways, top-1
    agreement, Jaccard@k, per-layer CKA and cosine."""
    st, pos, sim = token_pass(seqs, model, pad_id, device, temperatures, topk, chunk_size, batch_size, reference)
    rep = summarize(st, pos)
    res = sim.result()
    return {"entropy": rep["entropy"]["mean"], "top1_prob": rep["top1_prob"]["mean"],
            "temperature_entropy": rep["temperature_entropy"], "topk_mass": rep["topk_mass"],
            "kl_forward": rep["reference"]["kl_forward"], "kl_reverse": rep["reference"]["kl_reverse"],
            "top1_agreement": rep["reference"]["top1_agreement"],
            "topk_jaccard": rep["reference"]["topk_jaccard"], "cka": res["cka"], "cosine": res["cosine"]}


def run_diagnose(recipe: DiagnoseRecipe, checkpoint: str, progress: Progress = NULL) -> dict:
    out = recipe.output.out
    d = recipe.diagnose
    check_out(out, recipe.output.overwrite, (checkpoint, d.reference, d.texts, getattr(recipe.data, "path", None),
                                             getattr(recipe.data, "data_dir", None)))
    started = time.time()
    if d.texts is None:
        from tsopsd_cli.engines import require

        require(recipe.rollout.engine)
    progress.log(f"loading {checkpoint}")
    loaded = load_checkpoint(checkpoint, recipe.model)
    ref = rows = None
    if d.reference is not None:
        progress.log(f"loading the reference {d.reference}")
        ref = load_checkpoint(d.reference, recipe.model)
        if not same_tokenizer(loaded.tokenizer, ref.tokenizer):
            raise CheckpointError(f"{d.reference}: the reference has a different tokenizer; "
                                  "token-level comparisons need the same vocabulary")
        vocab_rows = shared_rows(loaded.model, ref.model)
        if vocab_rows[0] != vocab_rows[1]:
            rows = vocab_rows[2]
            progress.log(f"the LM heads have {vocab_rows[0]} and {vocab_rows[1]} rows (the same tokenizer, padded "
                         f"differently): every statistic is over the {rows} rows both have")
    check_head_matches(loaded.model, loaded.tokenizer)
    rollout_summary = marks = first_prompt = None
    if d.texts is not None:
        seqs = texts_sequences(loaded.tokenizer, d.texts)
    else:
        seqs, rollout_summary, marks, first_prompt = sample_sequences(recipe, loaded, progress)
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
    files = []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    h = report["entropy"]["histogram"]
    ax.stairs(h["counts"], h["edges"], fill=True)
    ax.set_xlabel("token entropy (nats)")
    ax.set_ylabel("tokens")
    fig.tight_layout()
    fig.savefig(directory / "entropy_histogram.png", dpi=110)
    files.append("entropy_histogram.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(report["per_position"]["entropy"])
    ax.set_xlabel("completion position")
    ax.set_ylabel("mean entropy (nats)")
    fig.tight_layout()
    fig.savefig(directory / "entropy_by_position.png", dpi=110)
    files.append("entropy_by_position.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    te = report["temperature_entropy"]
    ax.plot([float(t) for t in te], list(te.values()), marker="o")
    ax.set_xlabel("temperature")
    ax.set_ylabel("mean entropy (nats)")
    fig.tight_layout()
    fig.savefig(directory / "entropy_vs_temperature.png", dpi=110)
    files.append("entropy_vs_temperature.png")
    plt.close(fig)
    return files
