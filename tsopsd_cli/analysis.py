"""Token statistics of a model on given sequences, alone or against a reference model of the same tokenizer:
entropy (at several temperatures), top-1 probability, top-k mass, KL both ways, top-1 agreement, Jaccard@k and
per-layer representation similarity. Used by `tsopsd diagnose` and by reheat's before/after report.

Every statistic covers completion tokens only and comes from a chunked pass over hidden states (core.stats): no
[batch, length, vocab] tensor.
"""

from __future__ import annotations

import torch

from tsopsd_cli.core import stats as S
from tsopsd_cli.core.representation import LayerSimilarity
from tsopsd_cli.modeling import completion_hidden, decoder_and_head, pack
from tsopsd_cli.progress import NULL, Progress


def mean_or_nan(xs) -> float:
    """The mean of `xs`, NaN when there is none."""
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
               ref_model=None, progress: Progress = NULL, rows: int | None = None,
               ref_temperature: float | None = None):
    """Chunked statistics over all completion tokens of `seqs` [(prompt ids, completion ids)] under `model`
    (against `ref_model` when given; with `ref_temperature`, also the mass overlaps with the reference at that
    temperature); `rows`: use only the first `rows` logits of each head (shared_rows).
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
                                               target=batch.targets, ref_hidden=ref_hidden, ref_head=ref_head,
                                               ref_temperature=ref_temperature))
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
                   chunk_size: int = 256, batch_size: int = 16, ref_temperature: float | None = None) -> dict:
    """The statistics of `model` against `reference` on the same tokens (reheat's before/after summary): entropy
    at each of `temperatures` (keys formatted with :g), top-1 probability, top-k mass, KL both ways, top-1
    agreement, Jaccard@k, per-layer CKA and cosine; with `ref_temperature`, also `mass_overlap` (sum_v min(p, q))
    and `topk_overlap_mass` (the share of q's top-k mass on tokens in the model's top-k), q = the reference at
    that temperature (core.stats.mass_overlaps)."""
    st, pos, sim = token_pass(seqs, model, pad_id, device, temperatures, topk, chunk_size, batch_size, reference,
                              ref_temperature=ref_temperature)
    rep = summarize(st, pos)
    res = sim.result()
    extra = {} if st.mass_overlap is None else {
        "mass_overlap": float(st.mass_overlap.double().mean()),
        "topk_overlap_mass": {str(k): float(v.double().mean()) for k, v in st.topk_overlap_mass.items()}}
    return {**extra, "entropy": rep["entropy"]["mean"], "top1_prob": rep["top1_prob"]["mean"],
            "temperature_entropy": rep["temperature_entropy"], "topk_mass": rep["topk_mass"],
            "kl_forward": rep["reference"]["kl_forward"], "kl_reverse": rep["reference"]["kl_reverse"],
            "top1_agreement": rep["reference"]["top1_agreement"],
            "topk_jaccard": rep["reference"]["topk_jaccard"], "cka": res["cka"], "cosine": res["cosine"]}
