"""Wall time per GRPO step: `tsopsd rl` vs TRL's GRPOTrainer on the same model, prompts and settings, same run.

    pip install trl==1.16.0   # not a tsopsd dependency
    tsopsd toy init --out runs/toy-base
    python benchmarks/rl_vs_trl.py --checkpoint runs/toy-base [--steps 6] [--rounds 3]

Both sides: the same checkpoint, the same toy train prompts, 16 prompts x 8 completions per step, at most 48 new
tokens, temperature 1, top-k/top-p off, one optimiser step per rollout batch, lr 1e-5, clip 0.2/0.28, token-mean
loss (TRL: loss_type "dapo"), no KL, rewards from the same grader (2 worker processes), hf generation (no vLLM),
CPU, float32. The first step of each side is a warm-up and is not timed. Each side runs in a fresh subprocess,
`--rounds` times, alternating.
Target (issue 4): tsopsd at most 0.5x TRL's time per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arms import timed_steps, trl_step_timer, tsopsd_vs_trl  # noqa: E402

PROMPTS, GENERATIONS, MAX_NEW, LR, GRADER_WORKERS = 16, 8, 48, 1e-5, 2


def toy_rows(n: int):
    from tsopsd_cli.tasks import toy

    return [{"prompt": p.prompt, "answer": str(p.answer)} for p in toy.make_problems("train", n, seed=0)]


def run_tsopsd(ckpt: str, steps: int, out: Path) -> dict:
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.rl import RLRunner

    recipe = build_recipe("rl", None, parse_set_options([
        f"output.out={out}", "data.num_prompts=4096", f"train.prompts_per_step={PROMPTS}",
        f"rollout.num_generations={GENERATIONS}", f"rollout.max_new_tokens={MAX_NEW}", "rollout.batch_size=128",
        f"optim.lr={LR}", "grpo.epsilon=0.2", "grpo.epsilon_high=0.28", "grpo.loss_aggregation=token-mean",
        "train.micro_batch_size=64", f"train.max_steps={steps + 1}", "train.save_every=0",
        "validation.enabled=false", "model.device=cpu", "output.plots=false",
        f"grpo.grader_workers={GRADER_WORKERS}"]))
    return timed_steps(RLRunner(recipe, ckpt), steps)


def run_trl(ckpt: str, steps: int, out: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tsopsd_cli.tasks.grading import Grader

    grader = Grader(workers=GRADER_WORKERS, timeout=5.0)

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
    times: list[float] = []
    trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=cfg, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list(toy_rows(4096)), callbacks=[trl_step_timer(times)])
    try:
        trainer.train()
    finally:
        grader.close()
    return {"side": "trl", "step_seconds": times[1:]}


if __name__ == "__main__":
    sys.exit(tsopsd_vs_trl(__file__, __doc__, run_tsopsd, run_trl))
