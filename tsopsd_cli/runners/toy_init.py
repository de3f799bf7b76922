"""`tsopsd toy init`: build the toy tokenizer and a tiny Qwen3 model, train it on worked solutions (SFT),
and save an ordinary checkpoint directory that every other command accepts."""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F

from tsopsd_cli import signals
from tsopsd_cli.checkpoint import atomic_dir, check_out, provenance, write_checkpoint
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import ToyInitRecipe
from tsopsd_cli.tasks import toy


def sft_batch(tokenizer, pairs: list[tuple[str, str]]):
    """Right-padded batch; loss only on the completion and its end-of-sequence token."""
    ids, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    y = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, (a, b) in enumerate(zip(ids, labels)):
        x[r, :len(a)] = torch.tensor(a)
        y[r, :len(b)] = torch.tensor(b)
        mask[r, :len(a)] = 1
    return x, mask, y


def run_toy_init(recipe: ToyInitRecipe, progress: Progress = NULL) -> dict:
    from transformers import Qwen3ForCausalLM

    out = recipe.output.out
    check_out(out, recipe.output.overwrite)
    started = time.time()
    tr, arch = recipe.train, recipe.model
    torch.manual_seed(tr.seed)
    random.seed(tr.seed)
    tokenizer = toy.build_tokenizer()
    config = toy.build_model_config(len(tokenizer), arch.hidden_size, arch.num_layers, arch.num_heads,
                                    arch.intermediate_size, arch.max_positions, tokenizer.pad_token_id,
                                    tokenizer.eos_token_id)
    model = Qwen3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    progress.log(f"toy model: Qwen3, {n_params / 1e6:.2f} M parameters, vocab {len(tokenizer)}")
    opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=(0.9, 0.98), weight_decay=tr.weight_decay)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, tr.warmup_steps))
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, tr.steps) / tr.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    stream = toy.iter_train_examples(tr.seed, tuple(sorted(set(tr.levels))), slip_rate=tr.slip_rate,
                                    prec_share=tr.prec_share)
    model.train()
    losses = []
    with progress.task("toy SFT", total=tr.steps) as advance:
        for step in range(tr.steps):
            signals.check("toy SFT (nothing written; rerun to start again)")
            x, mask, y = sft_batch(tokenizer, [next(stream) for _ in range(tr.batch_size)])
            logits = model(input_ids=x, attention_mask=mask).logits[:, :-1]  # [B, T-1, V]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), ignore_index=-100,
                                   label_smoothing=tr.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            advance(1, info=f"loss {loss.item():.3f}")
    model.eval()
    metrics = {"parameters": n_params, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
               "train_seconds": round(time.time() - started, 1)}
    metrics.update(evaluate_toy(model, tokenizer, tr.eval_problems, progress))
    prov = provenance("toy init", recipe, None, None, metrics, started)
    if out is not None:
        with atomic_dir(out, recipe.output.overwrite) as tmp:
            write_checkpoint(model, tokenizer, tmp, prov)
    return {"checkpoint": str(out) if out else None, **metrics}


def evaluate_toy(model, tokenizer, num: int, progress: Progress = NULL, seed: int = 0) -> dict:
    """Greedy and sampled (temperature 1) accuracy on toy test problems; of the sampled completions, the mean
    negative log-prob per token and the mean entropy at the decision points (toy.decision_positions) and at all
    other tokens."""
    from tsopsd_cli.engines import SamplingParams
    from tsopsd_cli.engines.hf import HFEngine
    from tsopsd_cli.tasks.grading import extract_answer

    problems = toy.make_problems("test", num, seed)
    engine = HFEngine(model, tokenizer, batch_size=128)
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    res = {}
    with progress.task("toy eval", total=2 * len(prompts)) as advance:
        for name, temp in (("greedy", 1e-4), ("sampled", 1.0)):
            comps = engine.generate(prompts, SamplingParams(temperature=temp, max_new_tokens=48, seed=seed),
                                    progress=advance)
            ok = [extract_answer(c.text) == str(problems[c.prompt_index].answer) for c in comps]
            res[f"test_accuracy_{name}"] = sum(ok) / len(ok)
            if name == "sampled":
                logps = [lp for c in comps for lp in c.logprobs]
                res["sampled_nll_per_token"] = -sum(logps) / max(1, len(logps))
                at, other = toy.decision_entropy_means(
                    [c.entropies or [] for c in comps],
                    [toy.decision_positions(problems[c.prompt_index], c.token_ids) for c in comps])
                res["sampled_entropy_decision"], res["sampled_entropy_other"] = at, other
    return res
