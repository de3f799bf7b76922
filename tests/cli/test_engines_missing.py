"""Asking for vLLM where it is not installed stops every command before any work: exit 4, one line."""

from __future__ import annotations

from tests.cli.test_cli import one_error_line
from tests.conftest import run_cli


def test_vllm_asked_for_and_missing_exits_4_before_any_work(tiny_ckpt, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "vllm.py").write_text("raise ImportError('vllm is not installed (test shim)')\n")
    env = {"PYTHONPATH": str(shim)}
    for args in (["rl", str(tiny_ckpt), "--out", str(tmp_path / "rl"), "--set", "rollout.engine=vllm"],
                 ["reheat", str(tiny_ckpt), "--out", str(tmp_path / "hot"), "--set", "rollout.engine=vllm"],
                 ["eval", str(tiny_ckpt), "--engine", "vllm", "--out", str(tmp_path / "ev")],
                 ["diagnose", str(tiny_ckpt), "--engine", "vllm", "--out", str(tmp_path / "d")]):
        line = one_error_line(run_cli(*args, env=env), code=4)
        assert "vLLM is not installed" in line and "install" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shim"]  # nothing created
