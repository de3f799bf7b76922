"""Peak memory and tokens/s of one TS-OPSD training step: chunked (tsopsd) vs naive full logits, same run.

    python benchmarks/reheat_memory.py [--vocab 151936] [--tokens 4096] [--hidden 256] [--layers 2]

Both arms: student forward + backward, frozen teacher forward, forward KL(teacher/temp || student) over the full
vocabulary on the same completion tokens, same random-initialised Qwen3 (tiny depth). The naive arm materialises
[batch, length, vocab] logits for student and teacher (as a straightforward implementation does); the chunked arm
is tsopsd's (hidden states, LM head per chunk with activation checkpointing). Each arm runs in a fresh
subprocess; peak extra memory = peak RSS - RSS after setup (CPU) or max_memory_allocated - allocated (CUDA).
Target (issue 5): at least 3x less peak memory and no slower.
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
    import torch.nn.functional as F

    from tsopsd_cli.core.chunked import token_divergence
    from tsopsd_cli.modeling import completion_hidden, decoder_and_head

    (student, teacher), batch = tiny_qwen3_batch(args, models=2)
    student.train()
    teacher.eval().requires_grad_(False)
    dev = batch.input_ids.device
    temp = 1.6
    base = baseline_mb(torch, dev)
    t0 = time.perf_counter()
    if name == "chunked":
        hidden, _ = completion_hidden(student, batch)
        with torch.no_grad():
            t_hidden, _ = completion_hidden(teacher, batch)
        t_w = decoder_and_head(teacher)[1].weight
        loss = token_divergence(hidden, decoder_and_head(student)[1].weight, lambda idx: t_hidden[idx] @ t_w.T,
                                "forward_kl", temp=temp, chunk_size=args.chunk_size).mean()
    else:
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, T, V]
        with torch.no_grad():
            t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s = logits[batch.rows, batch.cols].float()
        t = t_logits[batch.rows, batch.cols].float() / temp
        lt = F.log_softmax(t, -1)
        loss = (lt.exp() * (lt - F.log_softmax(s, -1))).sum(-1).mean()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = peak_extra_mb(torch, dev, base)
    return {"arm": name, "tokens": args.tokens, "seconds": seconds, "tokens_per_s": args.tokens / seconds,
            "peak_extra_mb": peak, "loss": float(loss)}


def main() -> int:
    args = memory_args(__doc__, chunk_size=512)
    if args.arm:
        print(json.dumps(arm(args.arm, args)))
        return 0
    res = run_arms(__file__, args, ("naive", "chunked"))
    if res is None:
        return 1
    for name, r in res.items():
        print(f"{name:8s} tokens={r['tokens']} peak_extra={r['peak_extra_mb']:.0f} MiB time={r['seconds']:.2f} s "
              f"tokens/s={r['tokens_per_s']:.0f} loss={r['loss']:.6f}")
    n, c = res["naive"], res["chunked"]
    mem, speed = n["peak_extra_mb"] / max(c["peak_extra_mb"], 1e-9), c["tokens_per_s"] / n["tokens_per_s"]
    same = abs(n["loss"] - c["loss"]) < 1e-4 * max(1.0, abs(n["loss"]))
    print(f"memory: naive/chunked = {mem:.1f}x (target >= 3x)  speed: chunked/naive = {speed:.2f}x "
          f"(target >= 1.0)  same loss: {same}")
    print(json.dumps({"device": args.device, "memory_ratio": mem, "speed_ratio": speed, "same_loss": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
