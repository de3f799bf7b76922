"""`tsopsd reheat`: TS-OPSD (temperature-scaled on-policy self-distillation), and the exact closed-form baseline.

TS-OPSD, as implemented here (the paper's exact loss and schedule are not public; each choice is a recipe option):
1. On-policy: each step samples `num_generations` completions for `prompts_per_step` prompts from the current
   student (hf engine, `rollout.temperature`, default 1). Only completion tokens enter the loss.
2. Self-teacher: the model's own logits divided by tau (`reheat.temp`, default 1.6). `teacher: frozen` (default)
   is a snapshot of the input checkpoint, never updated: the target stays fixed, as OPSD recommends for
   self-distillation. `teacher: live` uses the current student under stop-gradient (a moving target).
3. Divergence over the full vocabulary [forward_kl = KL(teacher || student)]: mass-covering, it pushes the student
   to put probability wherever the smoothed teacher does, which is what raises entropy; reverse_kl is
   mode-seeking and jsd (beta) sits between. Token-mean over all completion tokens of the step.
4. Computed from hidden states in chunks over the vocabulary, teacher logits chunk by chunk under no_grad, with
   activation checkpointing: no [batch, length, vocab] tensor exists.
5. Stopping: `train.max_steps`, or the student's mean token entropy on the step's rollouts reaching
   `target_entropy` or `target_entropy_ratio` x the teacher's entropy on the same tokens.

`--method fold`: for a model whose final norm has a scale and whose LM head is bias-free and applied to the
normed state (Qwen3, Llama, Mistral...), multiplying the final norm's weight by 1/tau makes every logit logit/tau.
Exactness is checked numerically before saving; other architectures are refused.
"""

from __future__ import annotations

import json
import time

import torch

from tsopsd_cli.checkpoint import Loaded, atomic_dir, check_out, load_checkpoint, provenance, write_checkpoint
from tsopsd_cli.core import stats as S
from tsopsd_cli.core.chunked import teacher_logits_at, token_divergence
from tsopsd_cli.engines import SamplingParams, encode_prompts
from tsopsd_cli.engines.hf import HFEngine
from tsopsd_cli.errors import CheckpointError
from tsopsd_cli.modeling import check_head_matches, decoder_and_head
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import DiagnoseRecipe, ReheatRecipe
from tsopsd_cli.runners.trainer import TrainingRun, row_seed
from tsopsd_cli.runners.training import check_finite_loss


# ------------------------------------------------------------------------------------------------------ fold
def final_norm(model):
    decoder, head = decoder_and_head(model)
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None) or getattr(decoder, "ln_f",
                                                                                                  None)
    return norm, head


def fold_temperature(model, tokenizer, tau: float) -> float:
    """Scale the final norm's weight by 1/tau in place; returns the max |logits_new - logits_old/tau| seen on a
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
        norm.weight.mul_(1.0 / tau)
        after = model(input_ids=probe).logits.double()
    err = float((after - before / tau).abs().max())
    scale = float(before.abs().max() / tau)
    tol = (1e-4 if after.dtype == torch.float64 or norm.weight.dtype == torch.float32 else 2e-2) * max(1.0, scale)
    if not err <= tol:
        with torch.no_grad():
            norm.weight.mul_(tau)
        raise CheckpointError(f"{name}: folding 1/tau into the final norm is not exact for this architecture "
                              f"(max logit error {err:.3g}); use --method ts-opsd")
    return err


def run_fold(recipe: ReheatRecipe, checkpoint: str, progress: Progress = NULL) -> dict:
    started = time.time()
    out = recipe.output.out
    check_out(out, recipe.output.overwrite)
    m = recipe.model
    ld = load_checkpoint(checkpoint, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code,
                         allow_pickle=m.allow_pickle)
    tau = recipe.reheat.temp
    err = fold_temperature(ld.model, ld.tokenizer, tau)
    report = {"command": "reheat", "method": "fold", "checkpoint": str(checkpoint),
              "source_fingerprint": ld.fingerprint, "temp": tau, "max_logit_error": err,
              "seconds": round(time.time() - started, 3)}
    prov = provenance("reheat", recipe, str(checkpoint), ld.fingerprint, {"method": "fold", "temp": tau,
                                                                         "max_logit_error": err}, started)
    with atomic_dir(out, recipe.output.overwrite) as tmp:
        write_checkpoint(ld.model, ld.tokenizer, tmp, prov)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["out"] = str(out)
    return report


# -------------------------------------------------------------------------------------------------- ts-opsd
class ReheatRunner(TrainingRun):
    command = "reheat"
    plot_keys = [("student_entropy", "student entropy (nats)"), ("top1_agreement", "top-1 agreement with input"),
                 ("loss", "divergence")]
    progress_info = ("loss", "student_entropy", "teacher_entropy")

    def prompts_per_step(self) -> int:
        return self.r.reheat.prompts_per_step

    def setup_method(self) -> None:
        self.input_model = self.frozen(self.checkpoint)  # the frozen teacher, and the "input" of the metrics
        self.engine = HFEngine(self.model, self.tok, batch_size=self.r.rollout.batch_size, lean=self.r.model.lean)
        self.before = self.summary_pass(self.input_model) if self.dist.main and self.step == 0 else None

    def rollout(self):
        rh, ro = self.r.reheat, self.r.rollout
        step_seed = self.next_seed()
        taken = self.stream.take(rh.prompts_per_step)
        mine = taken[self.dist.rank::self.dist.world]
        params = SamplingParams(num_generations=ro.num_generations, temperature=ro.temperature, top_p=ro.top_p,
                                top_k=ro.top_k, max_new_tokens=ro.max_new_tokens, stop=tuple(ro.stop),
                                row_seeds=tuple(row_seed(step_seed, pos) for pos, _ in mine))
        comps = self.engine.generate(encode_prompts(self.tok, [p.prompt for _, p in mine]), params)
        return [(c.prompt_ids, c.token_ids) for c in comps if c.token_ids], comps

    def train_step(self) -> dict:
        rh, tr = self.r.reheat, self.r.train
        t0 = time.perf_counter()
        seqs, comps = self.rollout()
        t1 = time.perf_counter()
        self.model.train()
        n_tok = self.dist.sum(sum(len(c) for _, c in seqs))
        self.opt.zero_grad(set_to_none=True)
        acc = {"loss": 0.0, "s_ent": 0.0, "t_ent": 0.0, "i_ent": 0.0, "agree": 0.0, "kl_in": 0.0}
        for s in range(0, len(seqs), tr.micro_batch_size):
            mb = seqs[s:s + tr.micro_batch_size]
            hidden, weight, pb = self.hidden(self.model, mb)
            with torch.no_grad():
                in_hidden, in_weight, _ = self.hidden(self.input_model, mb)
                if rh.teacher == "frozen":
                    t_hidden, t_weight = in_hidden, in_weight
                else:
                    t_hidden, t_weight = hidden.detach(), weight.detach()

            def teacher_logits(idx, h=t_hidden, w=t_weight):
                return h[idx] @ w.T  # [c, V]

            div = token_divergence(hidden, weight, teacher_logits, rh.divergence, rh.beta, rh.temp, tr.chunk_size,
                                   teacher_top_p=rh.teacher_top_p)
            loss = div.sum() / max(n_tok, 1.0)
            check_finite_loss(float(loss.detach()), self.step)
            loss.backward()
            with torch.no_grad():
                st = S.chunked_token_stats(hidden.detach(), lambda h: h @ weight.detach().T, [1.0], [1],
                                           tr.chunk_size, ref_hidden=in_hidden, ref_head=lambda h: h @ in_weight.T)
                tst = S.chunked_token_stats(  # the teacher as distilled: logits / tau, top-p nucleus
                    t_hidden, lambda h: teacher_logits_at(h @ t_weight.T, rh.temp, rh.teacher_top_p), [1.0], [1],
                    tr.chunk_size)
            acc["loss"] += float(div.detach().sum())
            acc["s_ent"] += float(st.entropy.sum())
            acc["t_ent"] += float(tst.entropy.sum())
            acc["agree"] += float(st.top1_agree.sum())
            acc["kl_in"] += float(st.kl_forward.sum())
        grad_norm = self.optimizer_step()
        t2 = time.perf_counter()
        tot = {k: self.dist.sum(v) / max(n_tok, 1.0) for k, v in acc.items()}
        row = {"loss": tot["loss"], "student_entropy": tot["s_ent"], "teacher_entropy": tot["t_ent"],
               "top1_agreement": tot["agree"], "kl_input": tot["kl_in"], "grad_norm": grad_norm,
               "response_length": self.global_mean([len(c.token_ids) for c in comps]),
               "tokens": n_tok, "tokens_per_s": n_tok / max(t2 - t0, 1e-9), "rollout_seconds": t1 - t0,
               "train_seconds": t2 - t1, "lr": self.sched.get_last_lr()[0]}
        if rh.target_entropy is not None and row["student_entropy"] >= rh.target_entropy:
            self.stop_reason = f"target_entropy {rh.target_entropy} reached"
        if rh.target_entropy_ratio is not None and \
                row["student_entropy"] >= rh.target_entropy_ratio * row["teacher_entropy"]:
            self.stop_reason = f"target_entropy_ratio {rh.target_entropy_ratio} reached"
        return row

    # ---------------------------------------------------------------- before/after report
    def summary_pass(self, model) -> dict:
        """Diagnose statistics of `model` against the input checkpoint on rollouts of the input model for fixed
        validation prompts (the same tokens before and after)."""
        from tsopsd_cli.runners.diagnose import summarize, token_pass
        from tsopsd_cli.tasks.benchmarks import load_benchmark, template_text

        if not hasattr(self, "_report_seqs"):
            v = self.r.validation
            name = v.benchmarks[0]
            problems = load_benchmark(name, v.data_dir, template_text(v.prompt_template),
                                      self.r.reheat.report_prompts, toy_num=self.r.reheat.report_prompts)
            eng = HFEngine(self.input_model, self.tok, batch_size=128, lean=self.r.model.lean)
            comps = eng.generate(encode_prompts(self.tok, [p.prompt for p in problems]), SamplingParams(
                num_generations=2, temperature=1.0, max_new_tokens=v.max_new_tokens,
                row_seeds=tuple(range(len(problems)))))
            self._report_seqs = [(c.prompt_ids, c.token_ids) for c in comps if c.token_ids]
        diag = DiagnoseRecipe(diagnose={"chunk_size": self.r.train.chunk_size})
        was = model.training
        model.eval()
        a = Loaded(model, self.tok, self.run.path, "", self.device, None)
        ref = Loaded(self.input_model, self.tok, self.run.path, "", self.device, None)
        st, pos, sim = token_pass(diag, self._report_seqs, a, ref, NULL)
        model.train(was)
        rep = summarize(diag, st, pos)
        res = sim.result()
        return {"entropy": rep["entropy"]["mean"], "top1_prob": rep["top1_prob"]["mean"],
                "temperature_entropy": rep["temperature_entropy"], "topk_mass": rep["topk_mass"],
                "kl_forward": rep["reference"]["kl_forward"], "kl_reverse": rep["reference"]["kl_reverse"],
                "top1_agreement": rep["reference"]["top1_agreement"],
                "topk_jaccard": rep["reference"]["topk_jaccard"], "cka": res["cka"], "cosine": res["cosine"]}

    def report_extra(self) -> dict:
        rh = self.r.reheat
        steps = [h for h in self.history if "student_entropy" in h]
        vals = [h for h in self.history if "val_accuracy" in h]
        after = self.summary_pass(self.model) if self.dist.main else None
        before = self.before if self.before is not None else (
            self.summary_pass(self.input_model) if self.dist.main else None)
        return {
            "method": "ts-opsd", "temp": rh.temp, "teacher": rh.teacher, "divergence": rh.divergence,
            "entropy": {"first": steps[0]["student_entropy"] if steps else None,
                        "last": steps[-1]["student_entropy"] if steps else None,
                        "teacher": steps[-1]["teacher_entropy"] if steps else None},
            "before": before, "after": after,
            "accuracy": {"before": vals[0]["val_accuracy"] if vals else None,
                         "after": vals[-1]["val_accuracy"] if vals else None},
        }


def run_reheat(recipe: ReheatRecipe, checkpoint: str, progress: Progress = NULL, resume: bool = False,
               restart: bool = False) -> dict:
    if recipe.reheat.method == "fold":
        return run_fold(recipe, checkpoint, progress)
    return ReheatRunner(recipe, checkpoint, progress, resume, restart).execute()
