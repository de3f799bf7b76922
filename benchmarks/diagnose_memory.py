"""Peak memory and tokens/s of the diagnose statistics pass: chunked (tsopsd) vs naive full logits, same run.

    python benchmarks/diagnose_memory.py [--vocab 151936] [--tokens 4096] [--hidden 256] [--layers 2]

Each arm runs in a fresh subprocess on the same random-initialised Qwen3 model and the same 4,096 completion
tokens. Peak extra memory is the process's peak RSS minus its RSS after setup (CPU), or
torch.cuda.max_memory_allocated minus the allocation after setup (CUDA). Both arms compute the same statistics:
entropy, top-1 probability, top-k mass (k = 1, 5, 10, 50), entropy at τ = 1.6, and log p(token).
Target (issue 2): chunked uses at least 5x less peak extra memory and is no slower.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arms import baseline_mb, memory_args, peak_extra_mb, run_arms, tiny_qwen3_batch  # noqa: E402


def arm(name: str, args) -> dict:
    import torch

    from tsopsd_cli.core import stats as S
    from tsopsd_cli.modeling import completion_hidden, decoder_and_head

    (model,), batch = tiny_qwen3_batch(args)
    model.eval()
    dev = batch.input_ids.device
    temps, ks = [1.0, 1.6], [1, 5, 10, 50]
    _, head = decoder_and_head(model)
    base = baseline_mb(torch, dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        if name == "chunked":
            hidden, _ = completion_hidden(model, batch)
            st = S.chunked_token_stats(hidden, head, temps, ks, args.chunk_size, target=batch.targets)
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, T, V]
            flat = logits[batch.rows, batch.cols]  # [N, V]
            st = S.logits_token_stats(flat, temps, ks, target=batch.targets)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = peak_extra_mb(torch, dev, base)
    return {"arm": name, "tokens": int(st.entropy.numel()), "seconds": seconds,
            "tokens_per_s": st.entropy.numel() / seconds, "peak_extra_mb": peak,
            "entropy_mean": float(st.entropy.mean())}


def main() -> int:
    args = memory_args(__doc__, chunk_size=256)
    if args.arm:
        print(json.dumps(arm(args.arm, args)))
        return 0
    results = run_arms(__file__, args, ("naive", "chunked"))
    if results is None:
        return 1
    for name, r in results.items():
        print(f"{name:8s} tokens={r['tokens']} peak_extra={r['peak_extra_mb']:.0f} MiB "
              f"time={r['seconds']:.2f} s tokens/s={r['tokens_per_s']:.0f} entropy={r['entropy_mean']:.5f}")
    n, c = results["naive"], results["chunked"]
    mem_ratio = n["peak_extra_mb"] / max(c["peak_extra_mb"], 1e-9)
    speed_ratio = c["tokens_per_s"] / n["tokens_per_s"]
    agree = abs(n["entropy_mean"] - c["entropy_mean"]) < 1e-3
    print(f"memory: naive/chunked = {mem_ratio:.1f}x (target >= 5x)  "
          f"speed: chunked/naive = {speed_ratio:.2f}x (target >= 1.0)  same statistics: {agree}")
    print(json.dumps({"device": args.device, "vocab": args.vocab, "tokens": args.tokens,
                      "memory_ratio": mem_ratio, "speed_ratio": speed_ratio, "same_statistics": agree}))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
