"""Wall time per TS-OPSD step: `tsopsd reheat` vs TRL's GKDTrainer set up as the same distillation, same run.

    pip install trl==1.16.0   # not a tsopsd dependency
    tsopsd toy init --out runs/toy-base
    python benchmarks/reheat_vs_trl.py --checkpoint runs/toy-base [--steps 6] [--rounds 3]

The same objective on both sides: on-policy (the student samples its own completions at temperature 1), forward
KL(teacher || student) over the full vocabulary on completion tokens, teacher = the input checkpoint at temp = 1.6.
TRL side: GKDTrainer with lmbda = 1 (always on-policy), beta = 0 (forward KL), sampling temperature 1, and as teacher
the input checkpoint with the temperature folded into its weights (`tsopsd reheat --method fold --temp 1.6`, exact:
its logits are the input's logits / 1.6). tsopsd side: `tsopsd reheat` with the frozen teacher at temp 1.6.
Both: 16 prompts x 4 completions per step, at most 48 new tokens, one optimiser step per batch, lr 1e-5, CPU,
float32, hf generation. The first step of each side is a warm-up and is not timed; each side runs in a fresh
subprocess, `--rounds` times, alternating. Target (issue 5): tsopsd at most 0.5x TRL's time per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arms import timed_steps, trl_step_timer, tsopsd_vs_trl  # noqa: E402

PROMPTS, GENERATIONS, MAX_NEW, LR, TEMP = 16, 4, 48, 1e-5, 1.6


def run_tsopsd(ckpt: str, steps: int, out: Path) -> dict:
    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.reheat import ReheatRunner

    recipe = build_recipe("reheat", None, parse_set_options([
        f"output.out={out}", "data.num_prompts=4096", f"train.prompts_per_step={PROMPTS}", f"reheat.temp={TEMP}",
        "reheat.teacher=frozen", "reheat.divergence=forward_kl", f"rollout.num_generations={GENERATIONS}",
        f"rollout.max_new_tokens={MAX_NEW}", "rollout.temperature=1.0", "rollout.batch_size=128", f"optim.lr={LR}",
        "optim.warmup_steps=0", "train.micro_batch_size=64", f"train.max_steps={steps + 1}", "train.save_every=0",
        "validation.enabled=false", "model.device=cpu", "output.plots=false"]))
    return timed_steps(ReheatRunner(recipe, ckpt), steps)


def run_trl(ckpt: str, steps: int, out: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
    from tsopsd_cli.runners.reheat import run_fold
    from tsopsd_cli.tasks import toy

    teacher_dir = out / "teacher"
    run_fold(build_recipe("reheat", None, parse_set_options([
        f"output.out={teacher_dir}", "reheat.method=fold", f"reheat.temp={TEMP}"])), ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="float32")
    prompts = [p.prompt for p in toy.make_problems("train", 4096, seed=0)]
    rows = [{"prompt": p} for p in prompts for _ in range(GENERATIONS)]

    def collate(batch):  # prompt-only batches: with lmbda = 1 every step replaces them by on-policy completions
        enc = tok([b["prompt"] for b in batch], padding=True, return_tensors="pt")
        # The Trainer divides the loss by the label count of the *collated* batch (num_items_in_batch); all -100
        # would divide by zero, so the prompt tokens are labelled (a constant scale of the loss, not the timing).
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels,
                "prompts": enc["input_ids"], "prompt_attention_mask": enc["attention_mask"]}

    cfg = GKDConfig(
        output_dir=str(out / "trl"), max_steps=steps + 1, learning_rate=LR,
        per_device_train_batch_size=PROMPTS * GENERATIONS, gradient_accumulation_steps=1, lmbda=1.0, beta=0.0,
        temperature=1.0, max_new_tokens=MAX_NEW,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, lr_scheduler_type="constant",
        warmup_steps=0, seed=0, dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False,
    )
    times: list[float] = []
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, processing_class=tok, data_collator=collate,
                         train_dataset=datasets.Dataset.from_list(rows), callbacks=[trl_step_timer(times)])
    trainer.generation_config.top_k = 0  # sample from the plain softmax, as tsopsd does
    trainer.generation_config.top_p = 1.0
    trainer.train()
    return {"side": "trl", "step_seconds": times[1:]}


if __name__ == "__main__":
    sys.exit(tsopsd_vs_trl(__file__, __doc__, run_tsopsd, run_trl))
