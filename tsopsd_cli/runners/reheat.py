"""`tsopsd reheat`: TS-OPSD (temperature-scaled on-policy self-distillation), and the exact closed-form baseline.

TS-OPSD, as implemented here (the paper's exact loss and schedule are not public; each choice is a recipe option):
1. On-policy: each step samples `num_generations` completions for `train.prompts_per_step` prompts from the current
   student (`rollout.temperature`, default 1). Only completion tokens enter the loss.
2. Self-teacher: the model's own logits divided by `reheat.temp` (default 1.6). `teacher: frozen` (default)
   is a snapshot of the input checkpoint, never updated: the target stays fixed, as OPSD recommends for
   self-distillation. `teacher: live` uses the current student under stop-gradient (a moving target). `teacher:
   ema` starts as the input checkpoint and trails the student: after every optimiser step its weights become
   decay x teacher + (1 - decay) x student (`teacher_ema_decay`), as TRL SDPO's teacher_model_kind ema
   (update rate 1 - decay) and siyan-zhao/OPSD's EMA teacher. Where ours departs: the average is kept in float32
   whatever model.dtype is (TRL averages in the teacher model's own dtype, where bf16 rounds away any change below
   about 0.2 % of a weight), sharded like the student under fsdp (OPSD keeps a full copy on every rank), written into
   every checkpoint so that a resume continues it exactly (TRL rebuilds its teacher from the model path, OPSD holds
   it in memory only), and the average starts from the input checkpoint (OPSD starts it from the student after the
   first optimiser step, so that the input's weight is dropped).
3. Divergence over the full vocabulary [forward_kl = KL(teacher || student)]: mass-covering, it pushes the student
   to put probability wherever the smoothed teacher does, which is what raises entropy; reverse_kl is
   mode-seeking and jsd (beta) sits between. Token-mean over all completion tokens of the step.
4. Computed from hidden states in chunks over the vocabulary, teacher logits chunk by chunk under no_grad, with
   activation checkpointing: no [batch, length, vocab] tensor exists.
5. Stopping: `train.max_steps`, or the student's mean token entropy on the step's rollouts reaching
   `target_entropy` or `target_entropy_ratio` x the teacher's entropy on the same tokens.
6. The report compares the result with the input on fixed rollouts of the input (entropy at temperature 1 and at
   temp, sharpness, KL, top-1 agreement, Jaccard@k, per-layer CKA): `analysis.compare_models`.

`--method fold`: for a model whose final norm has a scale and whose LM head is bias-free and applied to the
normed state (Qwen3, Llama, Mistral...), multiplying the final norm's weight by 1/temp makes every logit
logit/temp. Exactness is checked numerically before saving, to the rounding of the model's dtype; other
architectures are refused.
"""

from __future__ import annotations

import json
import time

import torch

from tsopsd_cli.analysis import compare_models
from tsopsd_cli.checkpoint import (atomic_dir, check_out, load_checkpoint, provenance, read_source,
                                   write_checkpoint)
from tsopsd_cli.engines import SamplingParams, encode_prompts
from tsopsd_cli.errors import CheckpointError
from tsopsd_cli.modeling import check_head_matches, decoder_and_head
from tsopsd_cli.parallel import dcp, sharding
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import ReheatRecipe
from tsopsd_cli.training.distill import distill_step
from tsopsd_cli.training.trainer import TrainingRun


# ------------------------------------------------------------------------------------------------------ fold
def final_norm(model):
    decoder, head = decoder_and_head(model)
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None) or getattr(decoder, "ln_f",
                                                                                                  None)
    return norm, head


def fold_temperature(model, tokenizer, temp: float) -> float:
    """Scale the final norm's weight by 1/temp in place; returns the max |logits_new - logits_old/temp| seen on a
    probe (CheckpointError when the architecture does not allow an exact fold)."""
    norm, head = final_norm(model)
    name = type(model).__name__
    if norm is None or getattr(norm, "weight", None) is None:
        raise CheckpointError(f"{name}: no final norm with a scale weight; temperature cannot be folded exactly")
    if getattr(head, "bias", None) is not None:
        raise CheckpointError(f"{name}: the LM head has a bias; temperature cannot be folded into the final norm")
    if getattr(norm, "bias", None) is not None:
        raise CheckpointError(f"{name}: the final norm has a bias (LayerNorm); scaling its weight does not scale "
                              "the logits, so the fold would not be exact")
    check_head_matches(model, tokenizer)
    dev = next(model.parameters()).device
    probe = torch.tensor([tokenizer("(7+5)*3-4=? Let x = 12 and y = 3.")["input_ids"][:32]], device=dev)
    with torch.no_grad():
        before = model(input_ids=probe).logits.double()
        norm.weight.mul_(1.0 / temp)
        after = model(input_ids=probe).logits.double()
    err = float((after - before / temp).abs().max())
    scale = float(before.abs().max() / temp)
    # Rounding of the model's own dtype: the scaled weight and every activation after it are rounded there
    # (bf16 keeps 8 significant bits), so the tolerance follows it; a non-exact fold is off by far more.
    eps = torch.finfo(norm.weight.dtype).eps
    tol = max(1e-4, 16 * eps) * max(1.0, scale)
    if not err <= tol:
        with torch.no_grad():
            norm.weight.mul_(temp)
        raise CheckpointError(f"{name}: folding 1/temp into the final norm is not exact for this architecture "
                              f"(max logit error {err:.3g}); use --method ts-opsd")
    return err


def run_fold(recipe: ReheatRecipe, checkpoint: str, progress: Progress = NULL) -> dict:
    started = time.time()
    out = recipe.output.out
    check_out(out, recipe.output.overwrite, (checkpoint,))
    ld = load_checkpoint(checkpoint, recipe.model)
    source = read_source(checkpoint)  # what the output copies, read with the weights
    temp = recipe.reheat.temp
    err = fold_temperature(ld.model, ld.tokenizer, temp)
    report = {"command": "reheat", "method": "fold", "checkpoint": str(checkpoint),
              "source_fingerprint": ld.fingerprint, "temp": temp, "max_logit_error": err,
              "dtype": str(ld.dtype).removeprefix("torch."), "seconds": round(time.time() - started, 3)}
    prov = provenance("reheat", recipe, str(checkpoint), ld.fingerprint, {"method": "fold", "temp": temp,
                                                                         "max_logit_error": err}, started)
    dtype = recipe.output.dtype if recipe.output.dtype != "auto" else source.dtype
    with atomic_dir(out, recipe.output.overwrite) as tmp:
        write_checkpoint(ld.model, ld.tokenizer, tmp, prov, dtype=dtype, generation_config=source.generation_config)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["out"] = str(out)
    return report


# -------------------------------------------------------------------------------------------------- ts-opsd
REPORT_BATCH = 2  # sequences per forward of the before/after comparison: it keeps every layer of both models


class ReheatRunner(TrainingRun):
    command = "reheat"
    plot_keys = [("student_entropy", "student entropy (nats)"), ("top1_agreement", "top-1 agreement with input"),
                 ("loss", "divergence")]
    progress_info = ("loss", "student_entropy", "teacher_entropy")

    def __init__(self, recipe: ReheatRecipe, checkpoint: str, progress: Progress = NULL, resume: bool = False,
                 restart: bool = False):
        super().__init__(recipe, checkpoint, progress, resume, restart)
        # made by setup_method (None before)
        self.input_model: torch.nn.Module | None = None  # the frozen teacher, and the "input" of the metrics
        self.ema: torch.nn.Module | None = None  # teacher: ema, the teacher (saved with every checkpoint)
        # the before/after report's pieces, saved with every checkpoint (method_state)
        self.before: dict | None = None  # the input model's summary, taken at step 0 (None: taken at the end)
        self._report_seqs: list | None = None  # its fixed rollouts (report_sequences), sampled once

    def setup_method(self) -> None:
        self.input_model = self.frozen(self.checkpoint)
        self.ema = self.ema_teacher() if self.r.reheat.teacher == "ema" else None
        self.before = self.summary_pass(self.input_model) if self.state.step == 0 else None

    def rollout(self):
        return self.on_policy_rollout()

    def train_step(self) -> dict:
        rh = self.r.reheat
        t0 = time.perf_counter()
        seqs, comps, engine_lps = self.rollout()
        t1 = time.perf_counter()
        teacher = {"frozen": self.input_model, "ema": self.ema, "live": None}[rh.teacher]
        row = distill_step(self.policy, teacher, self.input_model, seqs, comps, engine_lps, rh, t0, t1)
        if self.ema is not None:
            sharding.ema_update(self.ema, self.model, rh.teacher_ema_decay)
        if rh.target_entropy is not None and row["student_entropy"] >= rh.target_entropy:
            self.state.stop_reason = f"target_entropy {rh.target_entropy} reached"
        if rh.target_entropy_ratio is not None and \
                row["student_entropy"] >= rh.target_entropy_ratio * row["teacher_entropy"]:
            self.state.stop_reason = f"target_entropy_ratio {rh.target_entropy_ratio} reached"
        return row

    # ---------------------------------------------------------------- before/after report
    def report_sequences(self) -> list:
        """Fixed rollouts of the input model on the run's own prompts: the same tokens before and after."""
        if self._report_seqs is None:
            self._report_seqs = report_rollouts(self)
        return self._report_seqs

    def summary_pass(self, model) -> dict | None:
        """`model` against the input checkpoint (analysis.compare_models) at temperature 1 and at temp; the
        main process computes it while every process holds the gathered weights; every process gets the result.
        A sleep-capable rollout engine is put to sleep first: gathering two whole models while vLLM holds its
        share of the GPU is what would not fit."""
        seqs = self.report_sequences()  # (with the engine awake, before anything is gathered)
        self.rollouts_done()
        out = None
        with sharding.gathered(model), sharding.gathered(self.input_model):
            if self.dist.main:
                was = model.training
                model.eval()
                with self.pl.autocast():
                    out = compare_models(model, self.input_model, self.tok.pad_token_id, self.device, seqs,
                                         temperatures=sorted({1.0, self.r.reheat.temp}), topk=[1, 5, 10],
                                         chunk_size=self.r.train.chunk_size, batch_size=REPORT_BATCH)
                model.train(was)
        return self.dist.broadcast_object(out)  # every process takes the same branches after this

    def method_state(self) -> dict:
        # the report's rollouts travel with the checkpoint: after a resume the engine holds trained weights
        return {"before": self.before, "report_seqs": self._report_seqs}

    def load_method_state(self, state: dict, checkpoint_dir) -> None:
        self.before = state.get("before")
        self._report_seqs = state.get("report_seqs")
        if self.ema is not None:
            dcp.load_model(checkpoint_dir / "ema_teacher", self.ema)

    def extra_models(self) -> dict:
        return {"ema_teacher": self.ema} if self.ema is not None else {}

    def report_extra(self) -> dict:
        rh = self.r.reheat
        steps = [h for h in self.history if "student_entropy" in h]
        vals = [h for h in self.history if "val_accuracy" in h]
        after = self.summary_pass(self.model)
        before = self.before if self.before is not None else self.summary_pass(self.input_model)
        key = f"{rh.temp:g}"
        at_temp = {"before": before["temperature_entropy"][key] if before else None,
                   "after": after["temperature_entropy"][key] if after else None}
        return {
            "method": "ts-opsd", "temp": rh.temp, "teacher": rh.teacher, "divergence": rh.divergence,
            **({"teacher_ema_decay": rh.teacher_ema_decay} if rh.teacher == "ema" else {}),
            "entropy": {"first": steps[0]["student_entropy"] if steps else None,
                        "last": steps[-1]["student_entropy"] if steps else None,
                        "teacher": steps[-1]["teacher_entropy"] if steps else None},
            "entropy_at_temp": at_temp,
            "before": before, "after": after,
            "accuracy": {"before": vals[0]["val_accuracy"] if vals else None,
                         "after": vals[-1]["val_accuracy"] if vals else None},
        }


def report_rollouts(run) -> list[tuple[list[int], list[int]]]:
    """The before/after report's fixed rollouts: 2 completions of each of the first `reheat.report_prompts`
    prompts of the run's own prompt source, sampled at temperature 1 by the run's rollout engine while it still
    holds the input weights (setup, step 0). Each process samples every world-th prompt (seeded by the prompt's
    index, so the tokens do not depend on the number of processes) and every process receives all of them, in
    prompt order. Returns the non-empty (prompt ids, completion ids)."""
    v = run.r.validation
    problems = run.stream.problems[:run.r.reheat.report_prompts]
    mine = list(range(run.dist.rank, len(problems), run.dist.world))
    params = SamplingParams(num_generations=2, temperature=1.0, max_new_tokens=v.max_new_tokens,
                            stop=tuple(v.stop), row_seeds=tuple(mine))
    # every process calls the engine, with or without prompts: a sharded hf engine gathers collectively
    comps = run.generate(run.engine, encode_prompts(run.tok, [problems[i].prompt for i in mine]), params)
    local = [(mine[c.prompt_index], c.sample_index, c.prompt_ids, c.token_ids) for c in comps]
    merged = sorted((x for part in run.dist.gather_objects(local) for x in part), key=lambda x: (x[0], x[1]))
    return [(list(p), list(t)) for _, _, p, t in merged if t]


def run_reheat(recipe: ReheatRecipe, checkpoint: str, progress: Progress = NULL, resume: bool = False,
               restart: bool = False) -> dict:
    if recipe.reheat.method == "fold":
        return run_fold(recipe, checkpoint, progress)
    return ReheatRunner(recipe, checkpoint, progress, resume, restart).execute()
