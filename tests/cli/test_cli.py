"""`tsopsd`: exit codes, one-line errors on stderr, clean --json stdout, nothing half-written. The version, one
--json run and `python -m` go through the real entry point; the rest calls `main(argv)` in this process."""

from __future__ import annotations

import json

import pytest

from tests.conftest import one_error_line, run_main
from tests.unit.test_checkpoint import broken_copies
from tsopsd_cli import __version__


def test_version_and_help_examples(cli):
    p = cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"tsopsd {__version__}"
    for args in (["--help"], ["diagnose", "--help"], ["toy", "--help"], ["toy", "init", "--help"],
                 ["recipe", "--help"], ["recipe", "validate", "--help"], ["recipe", "show", "--help"],
                 ["eval", "--help"], ["eval", "grade", "--help"], ["rl", "--help"], ["reheat", "--help"],
                 ["demo", "--help"], ["plan", "--help"]):
        p = run_main(*args)
        assert p.returncode == 0 and "Example:" in p.stdout, args


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "tsopsd_cli", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and __version__ in p.stdout


def test_each_bad_checkpoint_exits_2_with_one_line_and_writes_nothing(tiny_ckpt, tmp_path):
    for name, path, fragment in broken_copies(tiny_ckpt, tmp_path):
        out = tmp_path / f"out-{name}"
        line = one_error_line(run_main("diagnose", str(path), "--texts", "unused.jsonl", "--out", str(out)))
        assert fragment in line, (name, line)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_flags_and_recipe_values_exit_2(tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    line = one_error_line(run_main("diagnose", str(tiny_ckpt), "--set", "rollout.temperature=-1", "--out",
                                   str(out)))
    assert "rollout.temperature: Input should be greater than 0" in line
    line = one_error_line(run_main("diagnose", str(tiny_ckpt), "--set", "rollout.nope=1"))
    assert "rollout.nope: unknown field" in line
    line = one_error_line(run_main("diagnose", str(tiny_ckpt), "--no-such-flag"))
    assert "No such option" in line
    p = run_main("diagnose", str(tiny_ckpt), "--set", "rollout.temperature=-1", "--set", "diagnose.topk=[0]")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 2
    line = one_error_line(run_main("diagnose", str(tiny_ckpt), "--texts", str(tmp_path / "missing.jsonl")))
    assert "missing.jsonl: no such file" in line
    assert not out.exists()
    # more toy problems than the split holds: a data error, not an internal one
    line = one_error_line(run_main("diagnose", str(tiny_ckpt), "--set", "data.num_prompts=100",
                                   "--set", "data.levels=[1]", "--out", str(out)))
    assert "could not draw 100 distinct toy test problems at levels [1]" in line and "data.num_prompts" in line
    assert not out.exists()


def test_recipe_validate_and_show(tmp_path):
    p = run_main("recipe", "show", "diagnose")
    assert p.returncode == 0 and p.stdout.startswith("command: diagnose")
    good = tmp_path / "good.yaml"
    good.write_text(p.stdout)
    bad = tmp_path / "bad.yaml"
    bad.write_text("command: diagnose\nrollout:\n  top_p: 2\n")
    p = run_main("recipe", "validate", str(good))
    assert p.returncode == 0 and p.stdout.strip() == f"ok {good}"
    p = run_main("recipe", "validate", str(good), str(bad))
    assert p.returncode == 2
    assert p.stderr.strip() == f"tsopsd: error: {bad}: rollout.top_p: Input should be less than or equal to 1"
    one_error_line(run_main("recipe", "show", "nonsense"))


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("texts") / "pairs.jsonl"
    rows = [{"prompt": "(3+4)*2=?\n", "completion": "3+4=7\n7*2=14\n\\boxed{14}"},
            {"prompt": "9-5=?\n", "completion": "9-5=4\n\\boxed{4}"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_diagnose_texts_json_is_one_clean_object_and_deterministic(cli, tiny_ckpt, tiny_ckpt_other, texts_file):
    """The real entry point's stdout (anything a library prints to the process's stdout lands there too) is one JSON
    object; the same command in this process gives the same numbers."""
    args = ("diagnose", str(tiny_ckpt), "--texts", str(texts_file), "--reference", str(tiny_ckpt_other), "--json")
    p1, p2 = cli(*args), run_main(*args)
    assert p1.returncode == 0, p1.stderr
    r = json.loads(p1.stdout)  # exactly one JSON object: json.loads fails on anything else
    assert p1.stdout.count("\n") == 1
    assert r["num_tokens"] == len("3+4=7\n7*2=14\n\\boxed{14}") + len("9-5=4\n\\boxed{4}")
    assert r == {**json.loads(p2.stdout), "seconds": r["seconds"]}
    for key in ("mean", "quantiles", "median", "histogram", "top_fraction_share"):
        assert key in r["entropy"]
    assert set(r["topk_mass"]) == {"1", "5", "10", "50"} and "mean" in r["top1_prob"]
    assert set(r["temperature_entropy"]) == {"1", "1.2", "1.4", "1.6", "2"}
    ref = r["reference"]
    assert ref["kl_forward"] > 0 and ref["kl_reverse"] > 0 and 0 <= ref["top1_agreement"] <= 1
    assert set(ref["topk_jaccard"]) == {"1", "5", "10", "50"} and len(ref["cka"]) == 2
    same = json.loads(run_main("diagnose", str(tiny_ckpt), "--texts", str(texts_file), "--reference", str(tiny_ckpt),
                               "--json").stdout)["reference"]
    assert same["kl_forward"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1
    assert same["topk_jaccard"]["10"] == 1 and same["cka"] == pytest.approx([1.0, 1.0])


def test_diagnose_sampled_writes_outputs_atomically_and_refuses_existing(tiny_ckpt, tmp_path):
    out = tmp_path / "diag"
    p = run_main("diagnose", str(tiny_ckpt), "--num-prompts", "4", "--num-generations", "2", "--max-new-tokens",
                 "16", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "entropy mean" in p.stdout
    names = {f.name for f in out.iterdir()}
    assert {"report.json", "per_position.csv", "recipe.yaml"} <= names
    r = json.loads((out / "report.json").read_text())
    assert r["rollouts"]["num_prompts"] == 4 and r["rollouts"]["num_generations"] == 2
    assert 0 <= r["rollouts"]["accuracy"] <= 1 and r["mode"] == "sampled"
    try:
        import matplotlib  # noqa: F401

        assert {"entropy_histogram.png", "entropy_by_position.png", "entropy_vs_temperature.png"} <= names
    except ImportError:
        pass
    header = (out / "per_position.csv").read_text().splitlines()[0]
    assert header == "position,count,entropy,top1_prob"
    line = one_error_line(run_main("diagnose", str(tiny_ckpt), "--num-prompts", "2", "--out", str(out)))
    assert "already exists (pass --overwrite" in line
    p = run_main("diagnose", str(tiny_ckpt), "--num-prompts", "2", "--num-generations", "1", "--out", str(out),
                 "--overwrite", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["rollouts"]["num_prompts"] == 2
    assert sorted(x.name for x in tmp_path.iterdir()) == ["diag"]
