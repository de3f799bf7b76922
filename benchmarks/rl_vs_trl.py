"""Wall time per GRPO step: `tsopsd rl` vs TRL's GRPOTrainer on the same model, prompts and settings, same run.

    pip install trl==1.16.0   # not a tsopsd dependency
    tsopsd toy init --out runs/toy-base
    python benchmarks/rl_vs_trl.py --checkpoint runs/toy-base [--steps 6]

Both sides: the same checkpoint, the same toy train prompts, 16 prompts x 8 completions per step, at most 48 new
tokens, temperature 1, top-k/top-p off, one optimiser step per rollout batch, lr 1e-5, clip 0.2/0.28, token-mean
loss (TRL: loss_type "dapo"), no KL, rewards from the same grader, hf generation (no vLLM), CPU, float32. The first
step of each side is a warm-up and is not timed. Each side runs in a fresh subprocess.
Target (issue 4): tsopsd at most 0.5x TRL's time per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPTS, GENERATIONS, MAX_NEW, LR = 16, 8, 48, 1e-5


def toy_rows(n: int):
    from tsopsd_cli.tasks import toy

    return [{"prompt": p.prompt, "answer": str(p.answer)} for p in toy.make_problems("train", n, seed=0)]


def run_tsopsd(ckpt: str, steps: int, out: Path) -> dict:
    from tsopsd_cli.recipe import build_recipe, parse_set_options
    from tsopsd_cli.runners.rl import RLRunner

    recipe = build_recipe("rl", None, parse_set_options([
        f"output.out={out}", "data.num_prompts=4096", f"grpo.prompts_per_step={PROMPTS}",
        f"rollout.num_generations={GENERATIONS}", f"rollout.max_new_tokens={MAX_NEW}", "rollout.batch_size=128",
        f"optim.lr={LR}", "grpo.epsilon=0.2", "grpo.epsilon_high=0.28", "grpo.loss_aggregation=token-mean",
        "train.micro_batch_size=64", f"train.max_steps={steps + 1}", "train.save_every=0",
        "validation.enabled=false", "model.device=cpu", "output.plots=false"]))
    run = RLRunner(recipe, ckpt)
    run.setup()
    times = []
    try:
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            run.train_step()
            run.sched.step()
            run.step += 1
            times.append(time.perf_counter() - t0)
    finally:
        run.close()
    return {"side": "tsopsd", "step_seconds": times[1:]}


def run_trl(ckpt: str, steps: int, out: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tsopsd_cli.tasks.grading import Grader

    grader = Grader(workers=1, timeout=5.0)

    def correct(completions, answer, **_):
        return [1.0 if g.correct else 0.0 for g in grader.grade_many(list(zip(completions, answer)))]

    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32")
    cfg = GRPOConfig(
        output_dir=str(out), max_steps=steps + 1, learning_rate=LR,
        per_device_train_batch_size=PROMPTS * GENERATIONS // 2, gradient_accumulation_steps=2,
        num_generations=GENERATIONS, max_completion_length=MAX_NEW,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        num_iterations=1, use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
        gradient_checkpointing=False, lr_scheduler_type="constant", warmup_steps=0, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=cfg, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list(toy_rows(4096)), callbacks=[Timer()])
    try:
        trainer.train()
    finally:
        grader.close()
    return {"side": "trl", "step_seconds": times[1:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--side", choices=["tsopsd", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        fn = run_tsopsd if args.side == "tsopsd" else run_trl
        print(json.dumps(fn(args.checkpoint, args.steps, Path(args.workdir))))
        return 0
    import tempfile

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("trl", "tsopsd"):
            cmd = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--steps", str(args.steps),
                   "--side", side, "--workdir", str(Path(tmp) / side)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{side} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            s = res[side]["step_seconds"]
            print(f"{side:7s} {len(s)} timed steps, mean {sum(s) / len(s):.2f} s/step "
                  f"(min {min(s):.2f}, max {max(s):.2f})")
    a = sum(res["tsopsd"]["step_seconds"]) / len(res["tsopsd"]["step_seconds"])
    b = sum(res["trl"]["step_seconds"]) / len(res["trl"]["step_seconds"])
    print(f"tsopsd / TRL time per step = {a / b:.2f}x (target <= 0.5x)")
    print(json.dumps({"tsopsd_s_per_step": a, "trl_s_per_step": b, "ratio": a / b}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
