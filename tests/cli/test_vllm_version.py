"""An installed vLLM older than what the engine calls stops every command that asks for it before any work:
exit 4, one line naming the version needed and what is missing."""

from __future__ import annotations

from tests.cli.test_cli import one_error_line
from tests.conftest import run_cli


def test_a_vllm_without_llm_enqueue_exits_4_with_the_version_needed(tiny_ckpt, tmp_path):
    shim = tmp_path / "shim" / "vllm"
    shim.mkdir(parents=True)
    # an old vLLM: it has LLM and SamplingParams, but neither LLM.enqueue nor the layerwise weight reload
    (shim / "__init__.py").write_text(
        "__version__ = '0.16.0'\n"
        "class LLM:\n"
        "    def collective_rpc(self, *a, **k): pass\n"
        "    def apply_model(self, f): pass\n"
        "    def reset_prefix_cache(self): pass\n"
        "    def sleep(self, level=1): pass\n"
        "    def wake_up(self, tags=None): pass\n"
        "class SamplingParams:\n"
        "    __struct_fields__ = ('n', 'flat_logprobs')\n")
    env = {"PYTHONPATH": str(shim.parent)}
    for args in (["eval", str(tiny_ckpt), "--engine", "vllm", "--out", str(tmp_path / "ev")],
                 ["rl", str(tiny_ckpt), "--out", str(tmp_path / "rl"), "--set", "rollout.engine=vllm"]):
        line = one_error_line(run_cli(*args, env=env), code=4)
        assert "needs vllm>=0.17.0 (installed: 0.16.0" in line and "LLM.enqueue" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shim"]  # nothing created
