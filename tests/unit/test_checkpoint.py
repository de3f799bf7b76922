from __future__ import annotations

import json
import shutil

import pytest
import torch

from tsopsd_cli.checkpoint import atomic_dir, fingerprint, inspect_checkpoint, load_checkpoint
from tsopsd_cli.errors import CheckpointError, OutputExistsError


def test_saved_checkpoint_reloads_with_plain_transformers(tiny_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = load_checkpoint(tiny_ckpt, device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    ids = torch.tensor([tok("(1+2)*3=?\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, ours.model(input_ids=ids).logits)
    prov = json.loads((tiny_ckpt / "tsopsd.json").read_text())
    assert prov["tool"] == "tsopsd" and "recipe" in prov
    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert gen["top_k"] == 0 and gen["top_p"] == 1.0


def test_fingerprint_is_stable_and_content_sensitive(tiny_ckpt, tiny_ckpt_other):
    assert fingerprint(tiny_ckpt) == fingerprint(tiny_ckpt)
    assert fingerprint(tiny_ckpt) != fingerprint(tiny_ckpt_other)
    assert fingerprint(tiny_ckpt, full_hash_limit=0) != fingerprint(tiny_ckpt_other, full_hash_limit=0)


def test_atomic_dir_leaves_nothing_on_failure_and_refuses_existing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OutputExistsError):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def broken_copies(src, root):
    """(name, path, expected message fragment) for each kind of bad checkpoint."""
    cases = []

    def copy(name):
        d = root / name
        shutil.copytree(src, d)
        return d

    cases.append(("missing", root / "nope", "no such checkpoint directory"))
    d = copy("noconfig"); (d / "config.json").unlink(); cases.append(("noconfig", d, "no config.json"))  # noqa: E702
    d = copy("noweights"); (d / "model.safetensors").unlink(); cases.append(("noweights", d, "no model weights"))  # noqa: E702,E501
    d = copy("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append(("truncated", d, "truncated safetensors"))
    d = copy("corrupt"); (d / "model.safetensors").write_bytes(b"\x00" * 4 + b"garbage"); cases.append(("corrupt", d, "corrupt safetensors"))  # noqa: E702,E501
    d = copy("listheader")  # a header that is valid JSON but not an object (exit 1 before: "a bug")
    header = b"[1, 2, 3]"
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 64)
    cases.append(("listheader", d, "corrupt safetensors"))
    d = copy("notok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    cases.append(("notok", d, "no tokenizer files"))
    d = copy("arch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "not-a-real-arch"
    (d / "config.json").write_text(json.dumps(cfg))
    cases.append(("arch", d, "unsupported architecture"))
    d = copy("pickle")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    cases.append(("pickle", d, "only pickle weights"))
    f = root / "afile"
    f.write_text("x")
    cases.append(("file", f, "must be a directory"))
    return cases


def test_each_bad_checkpoint_gets_one_clear_error(tiny_ckpt, tmp_path):
    for name, path, fragment in broken_copies(tiny_ckpt, tmp_path):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, device="cpu")
        assert fragment in str(e.value), (name, str(e.value))
        assert "\n" not in str(e.value)


def test_inspect_accepts_good_checkpoint(tiny_ckpt):
    config, files = inspect_checkpoint(tiny_ckpt)
    assert config["model_type"] == "qwen3" and files[0].name == "model.safetensors"


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    from tsopsd_cli.errors import UsageError
    from tsopsd_cli.rundir import Lock

    out = tmp_path / "out"
    held = Lock(out)
    assert (tmp_path / ".out.lock").is_file() and not out.exists()
    with pytest.raises(UsageError, match=r"out: another tsopsd run is writing it \(pid \d+\)"):
        Lock(out)
    held.release()
    assert not (tmp_path / ".out.lock").exists()  # released locks leave no file behind
    Lock(out).release()  # free again once the first run is gone


@pytest.mark.parametrize("tied", [False, True])
def test_the_streamed_writer_shards_with_an_index_that_transformers_loads(tmp_path, tied):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    from tsopsd_cli.checkpoint import provenance, save_checkpoint
    from tsopsd_cli.tasks import toy

    tok = toy.build_tokenizer()
    cfg = toy.build_model_config(len(tok), 32, 2, 2, 64, 64, tok.pad_token_id, tok.eos_token_id)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    out = save_checkpoint(model, tok, tmp_path / "m", provenance("test", {}, None, None), max_shard_bytes=20_000,
                          dtype="bfloat16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({v for v in index["weight_map"].values()})
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert ("lm_head.weight" in index["weight_map"]) != tied  # tied embeddings are saved once
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for (n, a), (_, b) in zip(model.named_parameters(), back.named_parameters(), strict=True):
        torch.testing.assert_close(b, a.to(torch.bfloat16).float(), msg=n)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
