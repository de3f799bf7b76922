"""A lean decode-time forward for Llama-family decoders (Qwen3, Qwen2, Llama), in plain torch.

Token-by-token sampling calls the model once per new token. Through transformers each call walks the module tree,
builds masks and cache objects and grows the cache by concatenation; for small models and on CPU that overhead,
not arithmetic, is most of the rollout time. This module runs the same computation with the model's own
parameters (no copies) as a short sequence of torch ops and a preallocated KV cache. It is exact up to float
rounding: tests compare its logits with the transformers forward at every step.

Only architectures whose forward is fully known here are accepted (`supports`); everything else falls back to the
transformers path in engines.hf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}


def supports(model) -> bool:
    """True when this module computes exactly what the model's own forward computes."""
    model = getattr(model, "module", model)
    cfg = model.config
    if type(model).__name__ not in SUPPORTED or getattr(cfg, "hidden_act", None) != "silu":
        return False
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "mlp_bias", False):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1 or getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    layer = model.model.layers[0]
    return hasattr(model.model, "rotary_emb") and hasattr(layer.self_attn, "scaling")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it (float32 statistics, weight applied in the input dtype)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecoder:
    """Prefill a left-padded batch, then extend it one token per row at a time.

        dec = LeanDecoder(model)
        logits = dec.prefill(input_ids, attention_mask, max_new_tokens)   # [B, V] at the last position
        logits = dec.step(next_ids)                                        # [B, V]
    """

    def __init__(self, model):
        model = getattr(model, "module", model)
        self.model = model
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.qk_norm = SUPPORTED[type(model).__name__] == "qwen3"
        self.rotary = model.model.rotary_emb
        self.embed = model.model.embed_tokens.weight
        self.norm = model.model.norm.weight
        self.head = model.get_output_embeddings()
        self.layers = list(model.model.layers)
        self.scaling = self.layers[0].self_attn.scaling

    def _layer(self, i: int, x: torch.Tensor, cos, sin, start: int, attn_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] at cache positions start..start+T-1 -> [B, T, D]"""
        layer = self.layers[i]
        a = layer.self_attn
        B, T, _ = x.shape
        h = _rms(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(B, T, self.n_heads, self.head_dim)
        k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(B, T, self.n_kv, self.head_dim)
        v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q = _rms(q, a.q_norm.weight, a.q_norm.variance_epsilon)
            k = _rms(k, a.k_norm.weight, a.k_norm.variance_epsilon)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, d]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        kc, vc = self.cache[i]
        kc[:, :, start:start + T] = k
        vc[:, :, start:start + T] = v
        end = start + T
        if T == 1 and q.device.type == "cpu":  # one new token per row: on CPU grouped matmuls beat the generic
            # kernel's mask handling (on GPU the fused kernel is faster, measured in benchmarks/gpu_check.py)
            G = self.n_heads // self.n_kv
            qg = q.view(B, self.n_kv, G, self.head_dim)  # [B, KV, G, d]
            scores = torch.matmul(qg, kc[:, :, :end].transpose(-1, -2)) * self.scaling  # [B, KV, G, S]
            scores = scores.float().masked_fill(~attn_mask.view(B, 1, 1, end), float("-inf"))
            probs = scores.softmax(-1).to(vc.dtype)
            out = torch.matmul(probs, vc[:, :, :end]).view(B, self.n_heads, 1, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=attn_mask,
                                                 scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)
        x = x + F.linear(out.transpose(1, 2).reshape(B, T, -1), a.o_proj.weight, a.o_proj.bias)
        m = layer.mlp
        h = _rms(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        return x + F.linear(F.silu(F.linear(h, m.gate_proj.weight)) * F.linear(h, m.up_proj.weight),
                            m.down_proj.weight)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, attn_mask: torch.Tensor):
        """ids, positions: [B, T] -> logits at the last position [B, V]"""
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary(x, positions)
        for i in range(len(self.layers)):
            x = self._layer(i, x, cos, sin, start, attn_mask)
        return self.head(_rms(x[:, -1], self.norm, self.eps))

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """input_ids, attention_mask: [B, P] left-padded -> logits [B, V] predicting the first new token."""
        B, P = input_ids.shape
        dev, dtype = input_ids.device, self.embed.dtype
        total = P + max_new_tokens
        self.cache = [(torch.empty(B, self.n_kv, total, self.head_dim, device=dev, dtype=dtype),
                       torch.empty(B, self.n_kv, total, self.head_dim, device=dev, dtype=dtype))
                      for _ in self.layers]
        self.valid = torch.zeros(B, total, dtype=torch.bool, device=dev)  # keys that may be attended to
        self.valid[:, :P] = attention_mask.bool()
        self.length = P
        self.position = ((attention_mask.cumsum(-1) - 1).clamp(min=0))[:, -1:]  # [B, 1]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        # Padding query rows attend to themselves only, so that no row is fully masked (NaN-free cache).
        mask = (causal & self.valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)
        return self._forward(input_ids, positions, 0, mask.unsqueeze(1))

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row of the batch but `rows` [R] (finished sequences stop costing compute)."""
        self.cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache]
        self.valid = self.valid.index_select(0, rows)
        self.position = self.position.index_select(0, rows)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """next_ids: [B] -> logits [B, V] predicting the token after them."""
        start = self.length
        self.valid[:, start] = True
        self.position = self.position + 1
        self.length += 1
        mask = self.valid[:, None, None, :self.length]  # [B, 1, 1, S]
        return self._forward(next_ids[:, None], self.position, start, mask)
