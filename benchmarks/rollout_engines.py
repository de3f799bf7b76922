"""Rollout tokens/s: tsopsd's hf engine (lean path) vs the vLLM engine on the same model and prompts, same run.

    python benchmarks/rollout_engines.py [--prompts 64] [--new-tokens 256] [--shapes toy,wide] [--smoke]

Shapes (random-init Qwen3, float32, no downloads): `toy` hidden 128, 5 layers, 4 heads, the toy tokenizer's
vocabulary, toy problem prompts; `wide` hidden 512, 8 layers, 8 heads, intermediate 1536, vocabulary 32,000
(~58 M parameters), random-token prompts of 32 tokens. Both engines sample every prompt once (`--generations`)
at temperature 1, top-k/top-p off, with per-row seeds (the rl/reheat path), eos ignored so that every completion
is `--new-tokens` long; each timing follows an untimed warm-up call. The vLLM engine runs as `rollout.vllm`
configures it by default (compiled, `--vllm-eager` for enforce_eager), in-process, and also reports its start-up
seconds and the seconds of one weight sync (`sync_weights` of every parameter after the trainer's update, median
of `--syncs`). Each engine runs in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _arms import run_arms  # noqa: E402

SHAPES = {
    "toy": dict(hidden=128, layers=5, heads=4, intermediate=384, vocab=None),
    "wide": dict(hidden=512, layers=8, heads=8, intermediate=1536, vocab=32_000),
}


def word_tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` tokens ("<pad>", "<eos>", "w2", ...): the wide shape's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   padding_side="left", model_max_length=4096)


def build_checkpoint(shape: str, out: Path) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tsopsd_cli.checkpoint import provenance, save_checkpoint
    from tsopsd_cli.tasks import toy

    s = SHAPES[shape]
    tok = toy.build_tokenizer() if s["vocab"] is None else word_tokenizer(s["vocab"])
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["heads"] // 2,
                      head_dim=s["hidden"] // s["heads"], intermediate_size=s["intermediate"],
                      max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, rope_theta=10000.0)
    model = Qwen3ForCausalLM(cfg).eval()
    save_checkpoint(model, tok, out, provenance("benchmark", {}, None, None))
    return out


def prompts_for(shape: str, tok, n: int) -> list[list[int]]:
    import torch

    from tsopsd_cli.tasks import toy

    if SHAPES[shape]["vocab"] is None:
        return [tok(p.prompt)["input_ids"] for p in toy.make_problems("train", n, seed=0)]
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, len(tok), (n, 32), generator=g).tolist()


def run_arm(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsopsd_cli.engines.base import SamplingParams

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    prompts = prompts_for(args.shape, tok, args.prompts)
    params = SamplingParams(num_generations=args.generations, temperature=1.0, max_new_tokens=args.new_tokens,
                            row_seeds=tuple(range(len(prompts))))
    warm = SamplingParams(num_generations=1, max_new_tokens=8, row_seeds=(10**6,) * 4)
    out = {"arm": args.arm, "shape": args.shape, "threads": torch.get_num_threads()}
    if args.arm == "hf":
        from tsopsd_cli.engines.hf import HFEngine

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        engine = HFEngine(model, tok, batch_size=len(prompts) * args.generations, lean=True)
        out["lean"] = engine.lean
        gen = lambda p, sp: engine.generate(p, sp, ignore_eos=True)  # noqa: E731
        close = lambda: None  # noqa: E731
    else:
        from tsopsd_cli.engines.vllm import VLLMEngine
        from tsopsd_cli.recipe import VLLMOptions

        opts = VLLMOptions(enforce_eager=args.arm == "vllm-eager",
                           max_model_len=max(len(p) for p in prompts) + args.new_tokens + 8)
        engine = VLLMEngine(args.checkpoint, tok, opts, dtype="float32", seed=0)
        out["startup_s"] = engine.startup_seconds
        gen = lambda p, sp: engine.generate(p, sp, ignore_eos=True)  # noqa: E731
        close = engine.close
    try:
        gen(prompts[:4], warm)
        t0 = time.perf_counter()
        comps = gen(prompts, params)
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in comps)
        assert tokens == len(prompts) * args.generations * args.new_tokens, tokens  # full length everywhere
        out.update(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds)
        if args.arm != "hf":  # one weight sync per optimiser step: every parameter, streamed
            model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
            syncs = []
            for k in range(args.syncs):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p), alpha=1e-3)
                syncs.append(engine.sync_weights((n, p.detach()) for n, p in model.named_parameters()))
            out["sync_s"] = statistics.median(syncs)
            out["sync_all_s"] = syncs
            out["parameters"] = sum(p.numel() for p in model.parameters())
            gen(prompts[:4], warm)  # still samples after the syncs
    finally:
        close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--generations", type=int, default=1)
    ap.add_argument("--shapes", default="toy,wide")
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--vllm-eager", action="store_true", help="also time the vLLM engine with enforce_eager")
    ap.add_argument("--smoke", action="store_true", help="tiny fast run: 4 prompts x 16 tokens, toy shape")
    ap.add_argument("--arm", choices=["hf", "vllm", "vllm-eager"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args)))
        return 0
    if args.smoke:
        args.prompts, args.new_tokens, args.shapes, args.syncs = 4, 16, "toy", 1
    arms = ("hf", "vllm") + (("vllm-eager",) if args.vllm_eager else ())
    print(f"{args.prompts} prompts x {args.generations} x {args.new_tokens} new tokens, float32, CPU; arms {arms}")
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            ckpt = build_checkpoint(shape, Path(tmp) / shape)
            ns = argparse.Namespace(prompts=args.prompts, new_tokens=args.new_tokens, generations=args.generations,
                                    syncs=args.syncs, shape=shape, checkpoint=str(ckpt))
            res = run_arms(__file__, ns, arms)
            if res is None:
                return 1
            summary[shape] = res
            hf = res["hf"]["tokens_per_s"]
            params = res["vllm"]["parameters"]
            print(f"{shape} ({params / 1e6:.1f} M parameters, {res['hf']['threads']} threads):")
            print(f"  {shape} hf tokens/s:   {hf:8.0f}  (lean path {'on' if res['hf']['lean'] else 'off'})")
            for arm in arms[1:]:
                r = res[arm]
                print(f"  {shape} {arm} tokens/s: {r['tokens_per_s']:8.0f}")
                print(f"  {shape} {arm} / hf:       {r['tokens_per_s'] / hf:8.2f}x")
                print(f"  {shape} {arm} sync_weights s/step: {r['sync_s']:.4f} (all: "
                      f"{', '.join(f'{s:.4f}' for s in r['sync_all_s'])})")
                print(f"  {shape} {arm} start-up s: {r['startup_s']:.1f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
