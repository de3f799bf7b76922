"""A lean forward for Llama-family decoders (Qwen3, Qwen2, Llama), in plain torch, for the two hot paths:

- `LeanDecoder`: token-by-token sampling with a preallocated KV cache (the rollout engine). Through transformers
  each decode call walks the module tree, builds masks and cache objects and grows the cache by concatenation;
  for small models and on CPU that overhead, not arithmetic, is most of the rollout time.
- `shared_prefix_hidden`: the training forward over (prompt, completion) sequences. GRPO groups and TS-OPSD
  rollouts repeat each prompt once per completion; here every distinct prompt goes through the model once and
  the completions attend to its keys and values, so prompt tokens cost one forward (and one backward) per group
  instead of one per completion. The last completion token is not fed either (nothing reads what it predicts).

Both use the model's own parameters (no copies that could go stale), except that a rollout whose trained weights
are float32 masters computing in bfloat16 decodes from one bfloat16 copy made for that rollout (`DecodeWeights`).
They are exact up to float rounding: tests compare values and gradients with the transformers forward. Only
architectures whose forward is fully known here are accepted (`supports`); everything else, or `model.lean:
false`, uses the transformers forward.

The decoder also has a static form for CUDA graphs (`LeanDecoder(..., static=True)`, `forward_static`): a cache
zero-filled to its full length and a step that attends over all of it with the validity mask, reading only tensors
whose storage stays put, so that one captured graph replays every step of a batch (gpt-fast's and transformers'
StaticCache layout: `index_copy_` into the cache, attention over the provisioned length).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}

# When the training forward takes the shared-prefix layout on CUDA: when the tokens the transformers forward would
# run (every sequence padded to the longest, its prompt repeated per completion) are at least this many times the
# tokens the shared-prefix layout runs (each distinct prompt once, the fed completion tokens). 0: always (as before
# it was measured). `benchmarks/gpu_check.py` times both forwards at 8 x 512 tokens in groups of 4 and at 4 x 4,096
# tokens sharing a prompt and prints each one's sharing ratio: the next GPU run sets this from those rows
# (docs/benchmarks.md). On the CPU the shared-prefix layout is always taken (measured faster at every size tried).
LEAN_TRAIN_MIN_SHARING_CUDA = 0.0


def architecture(model) -> str | None:
    """The lean name of the model's class ("qwen3", ...), seen through wrappers: FSDP2 makes the class
    `FSDPQwen3ForCausalLM`, a subclass of the original; None when the architecture is not supported."""
    model = getattr(model, "module", model)
    return next((SUPPORTED[c.__name__] for c in type(model).__mro__ if c.__name__ in SUPPORTED), None)


def supports(model) -> bool:
    """True when this module computes exactly what the model's own forward computes (training included)."""
    model = getattr(model, "module", model)
    cfg = model.config
    if architecture(model) is None or getattr(cfg, "hidden_act", None) != "silu":
        return False
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "mlp_bias", False):
        return False
    if getattr(cfg, "attention_dropout", 0.0):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1 or getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    layer = model.model.layers[0]
    a = layer.self_attn
    if architecture(model) == "qwen3" and a.q_norm.variance_epsilon != a.k_norm.variance_epsilon:
        return False
    return hasattr(model.model, "rotary_emb") and hasattr(a, "scaling")


def sharing(seqs: list[tuple[list[int], list[int]]]) -> float:
    """Tokens the transformers forward runs for `seqs` (B rows padded to the longest sequence) over the tokens the
    shared-prefix forward runs (each distinct prompt once, padded to the longest prompt, plus every completion but
    its last token)."""
    if not seqs:
        return 1.0
    prompts = {tuple(p) for p, _ in seqs}
    padded = len(seqs) * max(len(p) + len(c) for p, c in seqs)
    shared = len(prompts) * max(len(p) for p in prompts) + sum(max(len(c) - 1, 0) for _, c in seqs)
    return padded / max(shared, 1)


def shared_prefix_pays(seqs: list[tuple[list[int], list[int]]], device: torch.device) -> bool:
    """Whether the training forward of `seqs` takes the shared-prefix layout (else the transformers forward): on
    the CPU always; on CUDA when `sharing(seqs)` reaches LEAN_TRAIN_MIN_SHARING_CUDA."""
    return device.type != "cuda" or sharing(seqs) >= LEAN_TRAIN_MIN_SHARING_CUDA


def always_shared_prefix(device: torch.device) -> bool:
    """True when `shared_prefix_pays` never sends a batch on `device` to the transformers forward (which then needs
    transformers' own activation checkpointing switched on)."""
    return device.type != "cuda" or LEAN_TRAIN_MIN_SHARING_CUDA <= 0


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it (float32 statistics, weight applied in the input dtype)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # torch's own op: the same arithmetic, fewer
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # kernels (tests: bit-equal here)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanModel:
    """The model's decoder as a few torch ops per layer; `weights(i)` is layer i's parameters as one tuple."""

    def __init__(self, model):
        model = getattr(model, "module", model)
        self.model = model
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.qk_norm = architecture(model) == "qwen3"
        self.rotary = model.model.rotary_emb
        self.norm = model.model.norm
        self.head = model.get_output_embeddings()
        self.layers = list(model.model.layers)
        self.scaling = self.layers[0].self_attn.scaling
        self.qk_eps = self.layers[0].self_attn.q_norm.variance_epsilon if self.qk_norm else None

    def embed(self, ids: torch.Tensor, head_in_loss: bool = False) -> torch.Tensor:
        """ids [...] -> embeddings [..., D]. With `head_in_loss` (the caller's loss also goes through the LM head)
        and an LM head that shares the embedding's weight, the lookup's gradient is sparse (the rows looked up):
        autograd adds it in place to the head's dense [V, D] gradient, where a dense lookup gradient would be a
        second [V, D] buffer in the backward pass (0.6 GB in float32 at Qwen3-0.6B's 151,936 x 1,024). Otherwise
        the gradient is dense, as the optimiser and FSDP's reduce-scatter need it."""
        emb = self.model.model.embed_tokens  # its padding_idx row gets no gradient, as in nn.Embedding
        sparse = head_in_loss and emb.weight is self.head.weight and emb.weight.requires_grad
        return F.embedding(ids, emb.weight, padding_idx=emb.padding_idx, sparse=sparse and torch.is_grad_enabled())

    def weights(self, i: int) -> tuple:
        layer = self.layers[i]
        a, m = layer.self_attn, layer.mlp
        return (layer.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                a.v_proj.weight, a.v_proj.bias, a.q_norm.weight if self.qk_norm else None,
                a.k_norm.weight if self.qk_norm else None, a.o_proj.weight, a.o_proj.bias,
                layer.post_attention_layernorm.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)

    def qkv(self, w: tuple, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B, T, D], cos/sin: [B, T, d] -> q [B, H, T, d], k and v [B, KV, T, d] (rotary applied)"""
        B, T, _ = x.shape
        d = self.head_dim
        h = _rms(x, w[0], self.eps)
        q = F.linear(h, w[1], w[2]).view(B, T, -1, d)
        k = F.linear(h, w[3], w[4]).view(B, T, -1, d)
        v = F.linear(h, w[5], w[6]).view(B, T, -1, d)
        if self.qk_norm:
            q, k = _rms(q, w[7], self.qk_eps), _rms(k, w[8], self.qk_eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, d]
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s, v

    def finish(self, w: tuple, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D], attn: [B, H, T, d] -> the layer's output [B, T, D] (output projection, MLP, residuals)"""
        B, T, _ = x.shape
        return self.finish_flat(w, x, attn.transpose(1, 2).reshape(B, T, -1))

    def finish_flat(self, w: tuple, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D], attn: [B, T, H * d] (heads side by side) -> the layer's output [B, T, D]"""
        x = x + F.linear(attn, w[9], w[10])
        h = _rms(x, w[11], self.eps)
        return x + F.linear(F.silu(F.linear(h, w[12])) * F.linear(h, w[13]), w[14])

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.norm.weight, self.eps)


class DecodeWeights:
    """The tensors the lean decoder reads, all in one dtype: the model's own parameters where they are in it already
    (a model loaded in its compute dtype, FSDP's gathered units), else one copy made here. A run whose float32
    master weights compute in bfloat16 (one process, ddp) decodes a rollout from such a copy, made once per
    rollout and freed with this object, instead of under autocast (which casts inside every step). The rotary
    tables stay the module's (float32, as the model computes them). `dtype` None: the parameters' own."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        lm = LeanModel(model)
        copies: dict[int, torch.Tensor] = {}

        def cast(t):
            if t is None or dtype is None or t.dtype == dtype:
                return t
            if id(t) not in copies:  # a tied embedding and LM head: one copy
                copies[id(t)] = t.detach().to(dtype)
            return copies[id(t)]

        with torch.no_grad():
            self.layers = [tuple(cast(t) for t in lm.weights(i)) for i in range(len(lm.layers))]
            emb = lm.model.model.embed_tokens
            self.embed, self.padding_idx = cast(emb.weight), emb.padding_idx
            self.norm = cast(lm.norm.weight)
            self.head, self.head_bias = cast(lm.head.weight), cast(lm.head.bias)
        self.copied_bytes = sum(t.numel() * t.element_size() for t in copies.values())


class LeanDecoder(LeanModel):
    """Prefill a left-padded batch, then extend it one token per row at a time.

        dec = LeanDecoder(model)
        logits = dec.prefill(input_ids, attention_mask, max_new_tokens)   # [B, V] at the last position
        logits = dec.step(next_ids)                                        # [B, V]
        dec.keep(rows)                                                     # drop finished rows

    `weights`: the tensors to read (`DecodeWeights`; default the model's own). With `static`, the cache is
    zero-filled and a step is `feed(rows, ids)` (eager) then `forward_static()` (what a CUDA graph captures)."""

    def __init__(self, model, weights: DecodeWeights | None = None, static: bool = False):
        super().__init__(model)
        self.dw = weights if weights is not None else DecodeWeights(model)
        self.w = self.dw.layers
        self.static = static

    @property
    def rows(self) -> int:
        """Rows of the batch (of the static cache: finished rows may still occupy some)."""
        return self.valid.shape[0]

    def _attend_one(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One new query per row as grouped matmuls: q [B, H, 1, d] over kc, vc [B, KV, S, d] where valid [B, S]
        -> [B, H, 1, d] (scores in the cache dtype, softmax in float32, as transformers' eager attention)."""
        B, S, d = q.shape[0], kc.shape[2], self.head_dim
        qg = q.view(B, self.n_kv, self.n_heads // self.n_kv, d)  # [B, KV, G, d]
        scores = torch.matmul(qg, kc.transpose(-1, -2)) * self.scaling  # [B, KV, G, S]
        scores = scores.float().masked_fill(~valid.view(B, 1, 1, S), float("-inf"))
        probs = scores.softmax(-1).to(vc.dtype)
        return torch.matmul(probs, vc).view(B, self.n_heads, 1, d)

    def _layer(self, i: int, x: torch.Tensor, cos, sin, start: int, attn_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] at cache positions start..start+T-1 -> [B, T, D]"""
        w = self.w[i]
        q, k, v = self.qkv(w, x, cos, sin)
        kc, vc = self.cache[i]
        end = start + k.shape[2]
        kc[:, :, start:end] = k
        vc[:, :, start:end] = v
        B, _, T, d = q.shape
        if T == 1 and q.device.type == "cpu":  # one new token per row: on CPU grouped matmuls beat the generic
            # kernel's mask handling (on GPU the fused kernel is faster, measured in benchmarks/gpu_check.py)
            out = self._attend_one(q, kc[:, :, :end], vc[:, :, :end], attn_mask.view(B, end))
        else:
            out = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=attn_mask,
                                                 scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)
        return self.finish(w, x, out)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, D] the last position's hidden states -> logits [B, V]"""
        return F.linear(_rms(h, self.dw.norm, self.eps), self.dw.head, self.dw.head_bias)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, attn_mask: torch.Tensor):
        """ids, positions: [B, T] -> logits at the last position [B, V]"""
        x = F.embedding(ids, self.dw.embed, padding_idx=self.dw.padding_idx)
        cos, sin = self.rotary(x, positions)
        for i in range(len(self.layers)):
            x = self._layer(i, x, cos, sin, start, attn_mask)
        return self._logits(x[:, -1])

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """input_ids, attention_mask: [B, P] left-padded -> logits [B, V] predicting the first new token.
        Identical rows (a prompt sampled several times) are computed once and their cache copied."""
        rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], 1)
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        if unique.shape[0] < rows.shape[0]:
            P = input_ids.shape[1]
            logits = self._prefill(unique[:, :P], unique[:, P:].to(attention_mask.dtype), max_new_tokens)
            self.keep(inverse)
            return logits.index_select(0, inverse)
        return self._prefill(input_ids, attention_mask, max_new_tokens)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        B, P = input_ids.shape
        dev, dtype = input_ids.device, self.dw.embed.dtype
        if torch.is_autocast_enabled(dev.type):
            dtype = torch.get_autocast_dtype(dev.type)
        total = P + max_new_tokens
        alloc = torch.zeros if self.static else torch.empty  # a static step reads every column: no NaN may sit there
        self.cache = [(alloc(B, self.n_kv, total, self.head_dim, device=dev, dtype=dtype),
                       alloc(B, self.n_kv, total, self.head_dim, device=dev, dtype=dtype))
                      for _ in self.layers]
        self.valid = torch.zeros(B, total, dtype=torch.bool, device=dev)  # keys that may be attended to
        self.valid[:, :P] = attention_mask.bool()
        self.length = P
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
        self.position = positions[:, -1:]  # [B, 1]
        if self.static:  # a row's rotary position minus its cache column: the same at every step
            self.shift = self.position - (P - 1)  # [B, 1]
            self.tokens = torch.zeros(B, dtype=torch.long, device=dev)  # the tokens a static step feeds
            self.write = torch.zeros(1, dtype=torch.long, device=dev)  # the cache column they go to
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        # Padding query rows attend to themselves only, so that no row is fully masked (NaN-free cache).
        mask = (causal & self.valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)
        return self._forward(input_ids, positions, 0, mask.unsqueeze(1))

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row of the batch but `rows` [R] (finished sequences stop costing compute). Static: new cache
        and input tensors (a graph captured before reads the old ones)."""
        self.cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache]
        self.valid = self.valid.index_select(0, rows)
        self.position = self.position.index_select(0, rows)
        if self.static:
            self.shift = self.shift.index_select(0, rows)
            self.tokens = self.tokens.index_select(0, rows)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """next_ids: [B] -> logits [B, V] predicting the token after them."""
        start = self.length
        self.valid[:, start] = True
        self.position = self.position + 1
        self.length += 1
        mask = self.valid[:, None, None, :self.length]  # [B, 1, 1, S]
        return self._forward(next_ids[:, None], self.position, start, mask)

    def feed(self, rows: torch.Tensor, next_ids: torch.Tensor) -> None:
        """The eager half of a static step: next_ids [R] for the cache rows `rows` [R] (the other rows keep their
        last token: finished rows whose output nobody reads), at the next cache column."""
        self.tokens.index_copy_(0, rows, next_ids)
        self.write.fill_(self.length)
        self.length += 1

    @torch.no_grad()
    def forward_static(self) -> torch.Tensor:
        """The decode step a CUDA graph captures: it reads only tensors whose storage stays put (the fed tokens, their
        column `write`, the cache, the validity mask) and writes the new keys and values in place; attention runs
        over the whole cache with the mask (`_attend_one`), so every step has the same shapes and nothing is planned
        per length. Idempotent for the same inputs (a warm-up and a replay of one step compute the same).
        -> logits [B, V]"""
        self.valid.index_fill_(1, self.write, True)
        x = F.embedding(self.tokens[:, None], self.dw.embed, padding_idx=self.dw.padding_idx)  # [B, 1, D]
        cos, sin = self.rotary(x, self.write + self.shift)  # positions [B, 1]
        for i in range(len(self.layers)):
            w = self.w[i]
            q, k, v = self.qkv(w, x, cos, sin)
            kc, vc = self.cache[i]
            kc.index_copy_(2, self.write, k)
            vc.index_copy_(2, self.write, v)
            x = self.finish(w, x, self._attend_one(q, kc, vc, self.valid))
        return self._logits(x[:, -1])


def causal_attention(q, k, v, scale: float, gqa: bool):
    """Causal attention, q [B, H, T, d] over k, v [B, KV, T, d] -> [B, H, T, d], with no mask tensor: the fused
    kernels skip the blocks above the diagonal and never form [B, H, T, T] scores. On CPU that is the flash kernel
    (grouped-query heads taken as they are). On CUDA only the fused kernels are allowed (flash, memory-efficient,
    cuDNN): the math kernel would materialise the scores (about 25 GB at 8k tokens), so a shape none of them
    takes fails loudly instead of silently. Grouped heads go in as they are in 16-bit dtypes (flash takes them);
    where no fused kernel takes them (float32: the memory-efficient kernel) the key/value heads are expanded:
    linear memory, [B, H, T, d]."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    if gqa and q.dtype in (torch.float16, torch.bfloat16):
        try:
            with sdpa_kernel(fused):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # no fused kernel takes grouped heads at this shape/card: expand them below
            pass
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    with sdpa_kernel(fused):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def shared_prefix_hidden(model, seqs: list[tuple[list[int], list[int]]], checkpoint_layers: bool = False,
                         layer_hook=None, head_in_loss: bool = False):
    """seqs: [(prompt ids, completion ids)] -> final-normed hidden states [N, D] at the positions that predict
    the completion tokens, in `modeling.pack` order (sequence by sequence, token by token).

    Distinct prompts run as one right-padded batch [U, P]; completions minus their last token run at positions
    len(prompt) + j, on the Nc real tokens only. The per-token work (norms, projections, MLP: most of the
    arithmetic) runs once per layer over both, side by side as [1, U * P + Nc, D]: one matmul per weight, as in
    the transformers forward (two per weight, prompts apart from completions, launched twice the matmuls on
    CUDA). Attention needs no mask tensor: for each distinct prompt u (length p_u) with G completions (the longest
    C_u fed tokens), the rows [prompt u, completion g] ([G, heads, p_u + C_u, d]) go through one causal attention
    call. A completion query then sees exactly its prompt and its own earlier tokens; the zero keys that pad a
    shorter completion sit after its last real token, where causality hides them; the prompt's own output is read
    from the first row (the other rows repeat its queries, G * p_u^2 / 2 extra scores, small beside the
    completions'). Memory is linear in the length: no [B, 1, T, T] mask, no [B, H, T, T] scores (the fused kernels
    skip the blocks above the diagonal).
    The first completion token is predicted from the prompt's last position, the others from the completion part.
    With `checkpoint_layers`, each layer's activations are recomputed in the backward pass. `layer_hook(i, fn,
    x)`, when given, runs layer i's computation `fn(i, x)` (sharding.layer_hook routes it through an FSDP layer
    module). `head_in_loss`: the caller's loss also goes through the model's LM head (see `LeanModel.embed`: a tied
    embedding's lookup gradient is then sparse)."""
    lm = LeanModel(model)
    g = _group_by_prompt(seqs, lm.head.weight.device)
    x, rope = _embed_shared_prefix(lm, g, head_in_loss)
    layer = functools.partial(_shared_prefix_layer, lm, g, rope)
    x = _run_layers(layer, len(lm.layers), x, checkpoint_layers, layer_hook)
    return lm.final_norm(_at_completion_positions(g, x))


@dataclass(frozen=True)
class _PromptGroups:
    """A batch of (prompt, completion) sequences arranged around its distinct prompts: the index tensors the
    shared-prefix forward reads (on the model's device unless said)."""

    B: int  # sequences
    P: int  # longest distinct prompt
    C: int  # longest completion minus its last token (the fed part)
    p_ids: torch.Tensor  # [U, P] the distinct prompts, right-padded with zeros (CPU)
    p_len: torch.Tensor  # [U]
    owner: torch.Tensor  # [B] the distinct prompt of each sequence
    seq: torch.Tensor  # [N] the sequence of each completion token, in pack order
    first: torch.Tensor  # [N] bool: the token is its completion's first (predicted from the prompt's last position)
    # per distinct prompt: its length, the rows of its completions that feed tokens, their longest fed part
    groups: list[tuple[int, torch.Tensor, int]]
    fed: list[int]  # [Nc] the fed tokens (each completion but its last token), in sequence order
    row: torch.Tensor | None  # [Nc] each fed token's sequence (None when C == 0)
    col: torch.Tensor | None  # [Nc] its column j - 1 in the [B, C] row layout
    slots: torch.Tensor | None  # [Nc] its slot row * C + col in that layout

    @property
    def U(self) -> int:
        return self.p_ids.shape[0]


def _group_by_prompt(seqs: list[tuple[list[int], list[int]]], dev: torch.device) -> _PromptGroups:
    index: dict[tuple[int, ...], int] = {}
    owner_list = [index.setdefault(tuple(p), len(index)) for p, _ in seqs]
    if any(not p for p in index):
        raise ValueError("every sequence needs at least one prompt token")
    prompts = list(index)
    U, B = len(prompts), len(seqs)
    P = max(len(p) for p in prompts)
    C = max(len(c) for _, c in seqs) - 1  # the last completion token is never an input that matters
    p_ids = torch.zeros(U, P, dtype=torch.long)
    for u, p in enumerate(prompts):
        p_ids[u, :len(p)] = torch.tensor(p)
    c_len = torch.tensor([len(c) for _, c in seqs], device=dev)
    # completion token j of sequence seq[n], for the N tokens in pack order: j == 0 is predicted from the prompt's
    # last position, j >= 1 from fed token j - 1
    seq = torch.repeat_interleave(torch.arange(B, device=dev), c_len)  # [N]
    j = torch.cat([torch.arange(int(n), device=dev) for n in c_len.tolist()]) if B else seq
    first = j == 0
    groups = []
    for u, p in enumerate(prompts):
        rows = [b for b in range(B) if owner_list[b] == u and len(seqs[b][1]) > 1]
        c_u = max((len(seqs[b][1]) - 1 for b in rows), default=0)
        groups.append((len(p), torch.tensor(rows, dtype=torch.long, device=dev), c_u))
    row = col = slots = None
    if C > 0:  # slot of each fed token in the [B, C] row layout (row b, column j - 1), in sequence order
        row, col = seq[~first], j[~first] - 1
        slots = row * C + col  # [Nc]
    return _PromptGroups(B=B, P=P, C=C, p_ids=p_ids, p_len=torch.tensor([len(p) for p in prompts], device=dev),
                         owner=torch.tensor(owner_list, device=dev), seq=seq, first=first, groups=groups,
                         fed=[t for _, c in seqs for t in c[:-1]] if C > 0 else [], row=row, col=col, slots=slots)


def _embed_shared_prefix(lm: LeanModel, g: _PromptGroups, head_in_loss: bool):
    """-> the embeddings of the prompts' rows [U, P] then the fed tokens [Nc], side by side: x [1, U * P + Nc, D],
    and the rotary tables (cos, sin [1, U * P + Nc, d]) at their positions."""
    dev = lm.head.weight.device
    U, P = g.p_ids.shape
    x = lm.embed(g.p_ids.to(dev), head_in_loss).view(1, U * P, -1)  # [1, U * P, D]
    positions = torch.arange(P, device=dev).repeat(U)  # [U * P]
    if g.C > 0:
        xc = lm.embed(torch.tensor(g.fed, dtype=torch.long, device=dev), head_in_loss)[None]  # [1, Nc, D]
        x = torch.cat([x, xc], 1)
        positions = torch.cat([positions, g.p_len[g.owner][g.row] + g.col])
    return x, lm.rotary(x, positions[None])


def _completion_rows(t: torch.Tensor, g: _PromptGroups) -> torch.Tensor:
    """[1, h, Nc, d] -> [B, h, C, d] (zeros where a row has no token)"""
    h, d = t.shape[1], t.shape[3]
    flat = t[0].transpose(0, 1)  # [Nc, h, d]
    return flat.new_zeros(g.B * g.C, h, d).index_copy(0, g.slots, flat).view(g.B, g.C, h, d).transpose(1, 2)


def _attend_by_prompt(lm: LeanModel, g: _PromptGroups, qp, kp, vp, qc, kc, vc):
    """prompt q/k/v [U, h, P, d], completion q/k/v [B, h, C, d] -> outputs [U, H, P, d] and [B, H, C, d]: one
    causal attention call per distinct prompt over the rows [prompt, completion g]."""
    gqa = lm.n_kv != lm.n_heads
    P, C = g.P, g.C
    out_p, out_c, c_rows = [], [], []
    for u, (n, rows, c_u) in enumerate(g.groups):
        if c_u == 0:  # no completion of this prompt feeds a token: the prompt alone
            o = causal_attention(qp[u:u + 1, :, :n], kp[u:u + 1, :, :n], vp[u:u + 1, :, :n], lm.scaling, gqa)
        else:
            G = rows.numel()
            q, k, v = (torch.cat([tp[u:u + 1, :, :n].expand(G, -1, -1, -1), tc.index_select(0, rows)[:, :, :c_u]],
                                 2) for tp, tc in ((qp, qc), (kp, kc), (vp, vc)))  # [G, h, n + c_u, d]
            o = causal_attention(q, k, v, lm.scaling, gqa)
            out_c.append(F.pad(o[:, :, n:], (0, 0, 0, C - c_u)))  # [G, H, C, d]
            c_rows.append(rows)
        out_p.append(F.pad(o[0, :, :n], (0, 0, 0, P - n)))  # padded prompt positions: zeros (never read)
    # rows without a fed token stay zeros (no slot reads them)
    out_c = qc.new_zeros(qc.shape).index_copy(0, torch.cat(c_rows), torch.cat(out_c))
    return torch.stack(out_p), out_c


def _shared_prefix_layer(lm: LeanModel, g: _PromptGroups, rope: tuple, i: int, x: torch.Tensor) -> torch.Tensor:
    """Decoder layer i over the prompts' rows and the fed tokens side by side: x [1, U * P + Nc, D] -> the same."""
    w = lm.weights(i)
    q, k, v = lm.qkv(w, x, *rope)  # [1, h, U * P + Nc, d]
    UP = g.U * g.P
    qp, kp, vp = (t[0, :, :UP].unflatten(1, (g.U, g.P)).transpose(0, 1) for t in (q, k, v))  # [U, h, P, d]
    if g.C == 0:  # nothing fed past the prompts
        out = causal_attention(qp, kp, vp, lm.scaling, lm.n_kv != lm.n_heads)  # [U, H, P, d]
        return lm.finish_flat(w, x, out.transpose(1, 2).reshape(1, UP, -1))
    out_p, out_c = _attend_by_prompt(lm, g, qp, kp, vp, *(_completion_rows(t[:, :, UP:], g) for t in (q, k, v)))
    out_c = out_c.transpose(1, 2).reshape(g.B * g.C, -1).index_select(0, g.slots)  # [Nc, H * d]
    return lm.finish_flat(w, x, torch.cat([out_p.transpose(1, 2).reshape(UP, -1), out_c])[None])


def _run_layers(layer, n_layers: int, x: torch.Tensor, checkpoint_layers: bool, layer_hook) -> torch.Tensor:
    """layer(i, x) for every layer, through `layer_hook` when given, recomputed in the backward pass with
    `checkpoint_layers` (while gradients are recorded)."""
    from torch.utils.checkpoint import checkpoint

    run = layer if layer_hook is None else (lambda i, x: layer_hook(i, layer, x))
    for i in range(n_layers):
        if checkpoint_layers and torch.is_grad_enabled():
            x = checkpoint(run, i, x, use_reentrant=False)
        else:
            x = run(i, x)
    return x


def _at_completion_positions(g: _PromptGroups, x: torch.Tensor) -> torch.Tensor:
    """x [1, U * P + Nc, D] -> [N, D]: the outputs that predict each completion token, in pack order. First tokens
    come from their prompt's last position; the rest are the fed tokens' outputs, already in order."""
    U, P = g.p_ids.shape
    flat = x[0]  # [U * P + Nc, D]
    first, seq, owner = g.first, g.seq, g.owner
    parts = [flat.index_select(0, (owner[seq] * P + g.p_len[owner[seq]] - 1)[first])]
    if g.C > 0:
        parts.append(flat[U * P:])
    order = torch.cat([first.nonzero().squeeze(-1), (~first).nonzero().squeeze(-1)])
    flat = torch.cat(parts)  # first tokens, then the rest
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return flat.index_select(0, inverse)
