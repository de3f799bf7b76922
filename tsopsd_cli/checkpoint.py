"""Hugging Face checkpoint directories: checked loading, atomic saving, fingerprints, provenance.

Loading refuses, with one line each (exit 2): a missing path, no config.json, no weights, pickle weights without
`allow_pickle`, corrupt or truncated safetensors, a missing tokenizer, an architecture transformers cannot load
as a causal LM. A config naming remote code (`auto_map`) is loaded with transformers' own class and a one-line
warning unless `trust_remote_code` is on. Outputs are refused before any work when they exist (without
`--overwrite`), are, contain or lie inside an input, or cannot be written (`check_out`).

Saving writes into a hidden temporary sibling and renames it into place, so a crash never leaves a directory that
looks complete. Weights are streamed one tensor at a time into sharded safetensors (with an index when over
5 GB), in the output dtype, so a sharded model is written without any process holding a second full copy. What an
output copies from its input (the generation config, the dtype of `output.dtype: auto`) is read once when the
run starts (`read_source`): an input removed or changed during a run cannot change its output. A filesystem that
refuses a write (full, read-only) is one EnvironmentFailure line (exit 8) naming what is kept.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tsopsd_cli import __version__
from tsopsd_cli.errors import CheckpointError, OutputExistsError, storage

PROVENANCE_FILE = "tsopsd.json"
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class Loaded:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # PreTrainedTokenizerBase
    path: Path
    fingerprint: str
    device: Any  # torch.device
    dtype: Any  # torch.dtype


# ----------------------------------------------------------------------------------------------- inspection
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index") from None
        files = sorted({path / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{path}: shard {f.name} named in the index is missing")
        return files
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def check_safetensors(file: Path) -> dict:
    """Read and check a safetensors header against the file size; returns the header."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return header


def inspect_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict, list[Path]]:
    """Check a checkpoint directory without loading weights; returns (config dict, weight files)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint must be a directory (a Hugging Face model folder)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint)")
    try:
        config = json.loads(cfg_file.read_text())
        assert isinstance(config, dict)
    except (ValueError, AssertionError):
        raise CheckpointError(f"{cfg_file}: not valid JSON") from None
    except OSError as e:
        raise CheckpointError(f"{cfg_file}: cannot read ({e.strerror})") from None
    files = _safetensors_files(path)
    if not files:
        pickles = [path / n for n in PICKLE_WEIGHTS if (path / n).is_file()]
        if pickles and not allow_pickle:
            raise CheckpointError(f"{path}: only pickle weights ({pickles[0].name}); pickle can run code on load, "
                                  "pass --allow-pickle if you trust this checkpoint")
        if not pickles:
            raise CheckpointError(f"{path}: no model weights (model.safetensors or an index)")
        files = pickles
    else:
        for f in files:
            check_safetensors(f)
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json or tokenizer_config.json)")
    return config, files


def fingerprint(path: str | os.PathLike, full_hash_limit: int = 1 << 30) -> str:
    """sha256 over config.json and the weights: whole files when they total under `full_hash_limit` bytes,
    else each file's header, size and 1 MiB at start, middle and end (fast for multi-GB checkpoints)."""
    path = Path(path)
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    files = _safetensors_files(path) or [path / n for n in PICKLE_WEIGHTS if (path / n).is_file()]
    total = sum(f.stat().st_size for f in files)
    for f in files:
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            if total <= full_hash_limit:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                for offset in (0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))):
                    fh.seek(offset)
                    h.update(fh.read(1 << 20))
    return "sha256:" + h.hexdigest()[:32]


# -------------------------------------------------------------------------------------------------- loading
def check_checkpoint(path: str | os.PathLike, model_section) -> dict:
    """What can be checked of a checkpoint without reading its weights (files, safetensors headers, a causal-LM
    architecture that transformers knows unless remote code is allowed); returns its config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config, _ = inspect_checkpoint(path, allow_pickle=model_section.allow_pickle)
    model_type = config.get("model_type")
    if not model_section.trust_remote_code and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CheckpointError(f"{path}: unsupported architecture (model_type={model_type!r} is not a causal LM "
                              "that transformers knows; --trust-remote-code runs the checkpoint's own code)")
    return config


def load_checkpoint(path: str | os.PathLike, model_section=None, *, dtype: str | None = None,
                    device: str | None = None, weights: bool = True) -> Loaded:
    """The one way a checkpoint is loaded: `model_section` is a recipe's `model` section (trust_remote_code,
    allow_pickle, attn_implementation, dtype, device); `dtype`/`device` override its dtype and device.
    `weights=False`: the same model class built from config.json on the meta device (no weights read, no memory),
    with the checkpoint's generation config, for a process that receives its shards from another
    (sharding.prepare)."""
    if model_section is None:
        from tsopsd_cli.recipe import ModelSection

        model_section = ModelSection()
    m = model_section
    config = check_checkpoint(path, m)
    path = Path(path)
    import transformers
    from transformers import AutoModelForCausalLM

    from tsopsd_cli.devices import resolve_device, resolve_dtype

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model_type = config.get("model_type")
    if not m.trust_remote_code and config.get("auto_map"):
        warn(f"{path}: config.json names code shipped with the checkpoint (auto_map); it is not run "
             f"(trust_remote_code is off) and transformers' own {model_type} class is used instead")
    dev = resolve_device(device or m.device)
    dt = resolve_dtype(dtype or m.dtype, dev)
    tokenizer = load_tokenizer(path, m.trust_remote_code)
    kwargs: dict[str, Any] = dict(dtype=dt, trust_remote_code=m.trust_remote_code,
                                  use_safetensors=not m.allow_pickle or None)
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if not weights:
        model = empty_model(path, kwargs)
        return Loaded(model=model, tokenizer=tokenizer, path=path, fingerprint=fingerprint(path),
                      device=torch_device("meta"), dtype=dt)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot load model ({_first_line(e)})") from None
    bad = non_finite_weight(model)
    if bad is not None:
        raise CheckpointError(f"{path}: the weight {bad} holds NaN or infinite values (a diverged or damaged "
                              "checkpoint); use an earlier one")
    model.to(dev)
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, path=path, fingerprint=fingerprint(path), device=dev, dtype=dt)


def torch_device(name: str):
    import torch

    return torch.device(name)


def empty_model(path: Path, kwargs: dict):
    """The checkpoint's causal-LM class on the meta device (parameters and buffers without storage), configured
    as `from_pretrained(path, **kwargs)` would configure it, with the checkpoint's generation config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    kw = {k: v for k, v in kwargs.items() if k != "use_safetensors"}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=kw.get("trust_remote_code", False))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kw)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot build the model from config.json ({_first_line(e)})") from None
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except Exception:  # noqa: BLE001 - the one from config.json stays, as from_pretrained would keep it
            pass
    model.eval()
    return model


def non_finite_weight(model) -> str | None:
    """The name of the first parameter or buffer with a NaN or infinite value, or None (in pieces of 16M values:
    no full-size mask of a large embedding)."""
    import torch

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        for piece in t.detach().reshape(-1).split(1 << 24):
            if not bool(torch.isfinite(piece).all()):
                return name
    return None


def checkpoint_dtype(path: str | os.PathLike) -> str:
    """The dtype a checkpoint's config.json declares (float32 when it declares none)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dt = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dt if dt in ("float32", "bfloat16", "float16") else "float32"


@dataclass(frozen=True)
class Source:
    """What an output copies from its input checkpoint, read once when the run starts (`read_source`)."""

    dtype: str  # the dtype its config.json declares: the output dtype of `output.dtype: auto`
    generation_config: bytes | None  # its generation_config.json byte for byte (None: it has none)


def read_source(path: str | os.PathLike) -> Source:
    """The input's files an output copies, read now (start-up), not when the output is written: an input removed
    or changed during a run then cannot change (or silently replace) what the output says."""
    gen = Path(path) / "generation_config.json"
    try:
        data = gen.read_bytes() if gen.is_file() else None
    except OSError as e:
        raise CheckpointError(f"{gen}: cannot read ({e.strerror})") from None
    return Source(dtype=checkpoint_dtype(path), generation_config=data)


def warn(message: str) -> None:
    sys.stderr.write(f"tsopsd: warning: {message}\n")
    sys.stderr.flush()


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, left-padding, with the eos token as pad when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise CheckpointError(f"{path}: cannot load tokenizer ({_first_line(e)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# --------------------------------------------------------------------------------------------------- saving
@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success rename it to `out` (replacing it only with `overwrite`).
    On any exception the temporary directory is removed and `out` is left as it was."""
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with storage(f"writing {out}", f"nothing was written to {out}; free space or fix the permissions, then "
                                       "run the same command again"):
            tmp.mkdir()
            yield tmp
            move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(src: Path, out: Path) -> None:
    """Rename a finished directory to `out`; an existing `out` (overwrite was checked) is moved aside first and
    deleted after, so `out` is at every moment either the old complete directory or the new one."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        try:
            src.rename(out)
        except BaseException:
            old.rename(out)  # the previous output goes back: `out` is never missing
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(out)


def check_out(out: str | os.PathLike | None, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse, before any work starts (exit 2): an existing output without `overwrite`; an output that is, lies
    inside, or contains one of `inputs` (checkpoints, reference, teacher, data files) — writing it would delete
    or alter them; an output whose folder cannot be written."""
    if out is None:
        return
    out = Path(out)
    here = out.resolve()
    for src in inputs:
        if src is None:
            continue
        there = Path(src).resolve()
        if here == there or here.is_relative_to(there) or there.is_relative_to(here):
            relation = ("is" if here == there else "lies inside" if here.is_relative_to(there) else "contains")
            raise OutputExistsError(f"{out}: the output {relation} the input {src}; choose another --out")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise OutputExistsError(f"{out}: cannot write in {out.parent} ({e.strerror})") from None


def provenance(command: str, recipe: Any, source: str | None, source_fingerprint: str | None,
               metrics: dict | None = None, started: float | None = None) -> dict:
    import torch
    import transformers

    now = time.time()
    return {
        "tool": "tsopsd",
        "version": __version__,
        "command": command,
        "argv": sys.argv,
        "recipe": recipe.model_dump(mode="json") if hasattr(recipe, "model_dump") else recipe,
        "source_checkpoint": source,
        "source_fingerprint": source_fingerprint,
        "metrics": metrics or {},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started or now)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "seconds": round(now - (started or now), 3),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def write_checkpoint(model, tokenizer, directory: Path, prov: dict, *, dtype: str | None = None,
                     generation_config: bytes | None = None, tensors=None, write: bool = True,
                     max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a Hugging Face checkpoint into an existing (temporary) directory: config, safetensors weights
    (sharded with an index above `max_shard_bytes`), tokenizer, generation config, tsopsd.json provenance.

    The weights are streamed one tensor at a time from `tensors` (default: the model's own parameters and
    persistent buffers; sharding.full_tensors for a sharded model, whose every process must call this,
    with `write` True on one), cast to `dtype` (default: the model's), so no second full copy is ever held.
    The generation config is `generation_config` (the input's bytes, `read_source`) when given; else one that
    samples without hidden top-k/top-p."""
    import transformers

    from tsopsd_cli.devices import DTYPES
    from tsopsd_cli.modeling import persistent_buffers

    transformers.utils.logging.disable_progress_bar()
    params = list(model.named_parameters()) + list(persistent_buffers(model))
    out_dtype = DTYPES[dtype] if dtype else params[0][1].dtype
    # shard plan from shapes alone (gathering comes later, one tensor at a time)
    sizes, plan, files = _shard_plan(params, out_dtype, max_shard_bytes)
    file_of = {name: files[i] for i, names in enumerate(plan) for name in names}
    stream = tensors if tensors is not None else ((n, t.detach()) for n, t in params)
    buffer: dict = {}
    for name, t in stream:
        if not write:
            continue
        t = t.to("cpu", dtype=out_dtype if t.is_floating_point() else t.dtype).contiguous()
        buffer[name] = t
        shard = plan[files.index(file_of[name])]
        if len(buffer) == len(shard):
            _save_safetensors(buffer, directory / file_of[name])
            buffer = {}
    if not write:
        return
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": file_of}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_configs(model, tokenizer, directory, out_dtype, generation_config)
    (directory / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")


def _save_safetensors(tensors: dict, path: Path) -> None:
    """safetensors' save_file, its I/O failures as the OSError they are: the library reports them as
    SafetensorError("... (os error N)") without an errno, which is read back here, where the write happens."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def _shard_plan(params: list, out_dtype, max_shard_bytes: int) -> tuple[dict[str, int], list[list[str]], list[str]]:
    """From the (name, tensor) pairs' shapes alone: (bytes of each tensor in `out_dtype`, the names of each shard
    in order, each shard's file name); a new shard starts where one would pass `max_shard_bytes`."""
    sizes = {name: t.numel() * (out_dtype.itemsize if t.is_floating_point() else t.element_size())
             for name, t in params}
    plan, current, used = [], [], 0
    for name, _ in params:
        if current and used + sizes[name] > max_shard_bytes:
            plan.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    plan.append(current)
    files = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    return sizes, plan, files


def _write_configs(model, tokenizer, directory: Path, out_dtype, generation_config: bytes | None) -> None:
    """config.json (the weights' dtype, the architecture without FSDP's wrapper class), the tokenizer, and the
    input's generation config byte for byte, else one that samples without hidden top-k/top-p."""
    config = copy.deepcopy(model.config)
    config.dtype = out_dtype
    base = next((c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP")
                 and c.__name__.endswith("ForCausalLM")), None)
    if base:
        config.architectures = [base]
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if generation_config is not None:
        (directory / "generation_config.json").write_bytes(generation_config)
    else:
        from transformers import GenerationConfig

        GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(directory)


def save_checkpoint(model, tokenizer, out: str | os.PathLike, prov: dict, overwrite: bool = False,
                    **kwargs) -> Path:
    with atomic_dir(out, overwrite) as tmp:
        write_checkpoint(model, tokenizer, tmp, prov, **kwargs)
    return Path(out)
