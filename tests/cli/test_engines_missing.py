"""Asking for vLLM where it is not installed stops every command before any work: exit 4, one line."""

from __future__ import annotations

import sys

from tests.conftest import one_error_line, run_main


def test_vllm_asked_for_and_missing_exits_4_before_any_work(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, as where it is not installed
    for args in (["rl", str(tiny_ckpt), "--out", str(tmp_path / "rl"), "--set", "rollout.engine=vllm"],
                 ["reheat", str(tiny_ckpt), "--out", str(tmp_path / "hot"), "--set", "rollout.engine=vllm"],
                 ["eval", str(tiny_ckpt), "--engine", "vllm", "--out", str(tmp_path / "ev")],
                 ["eval", str(tiny_ckpt), "--engine", "vllm", "--limit", "1"],
                 ["diagnose", str(tiny_ckpt), "--engine", "vllm", "--out", str(tmp_path / "d")]):
        line = one_error_line(run_main(*args), code=4)
        assert "vLLM is not installed" in line and "install" in line
    assert list(tmp_path.iterdir()) == []  # nothing created
