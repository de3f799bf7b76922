"""What a user of `tsopsd` sees, written down so that a change meant to move code only can be checked against it.

    python scripts/behaviour_snapshot.py take OUT.json          # on one commit
    python scripts/behaviour_snapshot.py compare A.json B.json  # exit 1 and one line per difference

It records, through the real entry point (`python -m tsopsd_cli`, one process per case):
- `--help` of every command and sub-command (text and exit code);
- `recipe show` of every command and the JSON schema of every recipe class;
- `recipe validate` of every shipped recipe, and `plan --json` of every shipped training recipe;
- a set of bad inputs (flags, recipes, checkpoints, data, --out): exit code and stderr, byte for byte;
- short runs on a tiny random checkpoint made here (diagnose, eval, rl, reheat, fold; `--json`): the exit code
  and the JSON result with times, paths and fingerprints of the temporary folder taken out.
Numbers of the short runs are compared exactly: a code move on the same machine changes none of them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["diagnose"], ["eval"], ["eval", "grade"], ["rl"], ["reheat"], ["demo"], ["plan"], ["toy"],
            ["toy", "init"], ["recipe"], ["recipe", "show"], ["recipe", "validate"]]
VOLATILE = {"seconds", "step_seconds", "rollout_seconds", "train_seconds", "tokens_per_s", "total_seconds",
            "weight_sync_seconds", "started", "finished", "created", "out", "checkpoint", "source_fingerprint",
            "fingerprint", "path", "samples_per_s", "grading_seconds", "generation_seconds", "time"}


def run(args: list[str], tmp: Path, env: dict | None = None) -> dict:
    full = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "120", **(env or {})}
    full.pop("TSOPSD_PROGRESS", None)
    full["PYTHONPATH"] = os.pathsep.join(x for x in (full.get("PYTHONPATH"), str(ROOT)) if x)
    p = subprocess.run([sys.executable, "-m", "tsopsd_cli", *args], capture_output=True, text=True, cwd=tmp,
                       env=full, timeout=900)
    clean = lambda text: text.replace(str(tmp), "TMP").replace(str(ROOT), "ROOT")  # noqa: E731
    return {"rc": p.returncode, "stdout": clean(p.stdout), "stderr": clean(p.stderr)}


def scrub(obj):
    """A JSON result without what differs between two runs of the same code: times, temporary paths, digests."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return re.sub(r"/tmp/[^\s'\"]*", "TMP", obj)
    return obj


def json_case(res: dict) -> dict:
    out = {"rc": res["rc"]}
    try:
        out["json"] = scrub(json.loads(res["stdout"]))
    except json.JSONDecodeError:
        out["stdout"] = res["stdout"]
        out["stderr"] = res["stderr"]
    return out


def error_case(res: dict) -> dict:
    return {"rc": res["rc"], "stderr": res["stderr"], "stdout": res["stdout"]}


def bad_inputs(tmp: Path, ckpt: Path) -> dict[str, list[str]]:
    (tmp / "dup.yaml").write_text("command: rl\noptim:\n  lr: 1.0e-5\n")
    (tmp / "bad.yaml").write_text("command: diagnose\nrollout:\n  top_p: 2\n")
    (tmp / "notyaml.yaml").write_text("a: [1,\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "nofield.jsonl").write_text('{"q": "1+1"}\n')
    (tmp / "exists").mkdir(exist_ok=True)
    c = str(ckpt)
    return {
        "diagnose-neg-temp": ["diagnose", c, "--set", "rollout.temperature=-1", "--out", "o"],
        "diagnose-unknown-field": ["diagnose", c, "--set", "rollout.nope=1"],
        "diagnose-no-such-flag": ["diagnose", c, "--no-such-flag"],
        "diagnose-two-errors": ["diagnose", c, "--set", "rollout.temperature=-1", "--set", "diagnose.topk=[0]"],
        "diagnose-missing-texts": ["diagnose", c, "--texts", "missing.jsonl"],
        "diagnose-too-many-toy": ["diagnose", c, "--set", "data.num_prompts=100", "--set", "data.levels=[1]",
                                  "--out", "o"],
        "diagnose-missing-ckpt": ["diagnose", "no-such-dir", "--out", "o"],
        "eval-unknown-benchmark": ["eval", c, "-b", "nope", "--out", "o"],
        "eval-out-exists": ["eval", c, "--out", "exists"],
        "eval-empty-data": ["eval", c, "--data", "empty.jsonl", "--out", "o"],
        "rl-no-out": ["rl", c],
        "rl-bad-engine": ["rl", c, "--out", "o", "--set", "rollout.engine=nope"],
        "rl-k1": ["rl", c, "--out", "o", "--set", "grpo.kl_estimator=k1"],
        "rl-nofield": ["rl", c, "--out", "o", "--data", "nofield.jsonl"],
        "rl-prompts-divisible": ["rl", c, "--out", "o", "--set", "grpo.mini_batches=100000"],
        "rl-recipe-for-other": ["rl", c, "--out", "o", "--recipe", "bad.yaml"],
        "rl-not-yaml": ["rl", c, "--out", "o", "--recipe", "notyaml.yaml"],
        "reheat-bad-divergence": ["reheat", c, "--out", "o", "--set", "reheat.divergence=nope"],
        "reheat-top-p-reverse": ["reheat", c, "--out", "o", "--set", "reheat.teacher_top_p=0.9", "--set",
                                 "reheat.divergence=reverse_kl"],
        "reheat-temp-zero": ["reheat", c, "--temp", "0", "--out", "o"],
        "recipe-validate-bad": ["recipe", "validate", "bad.yaml"],
        "recipe-show-nope": ["recipe", "show", "nope"],
        "plan-no-model": ["plan", "dup.yaml"],
        "plan-not-training": [
            "plan", str(ROOT / "recipes/eval/qwen3-4b-base.yaml")],
        "plan-bad-model": ["plan", str(ROOT / "recipes/rl/qwen3-4b-base.yaml"), "--model", "nope"],
        "demo-bad-arm": ["demo", "--out", "o", "--set", "demo.arms=[nope]"],
        "toy-init-bad": ["toy", "init", "--out", "o", "--set", "model.hidden_size=7"],
        "grade-missing": ["eval", "grade", "missing.jsonl"],
    }


def short_runs(ckpt: Path) -> dict[str, list[str]]:
    c = str(ckpt)
    small = ["--set", "rollout.max_new_tokens=12", "--set", "validation.limit=4", "--set",
             "validation.max_new_tokens=12", "--set", "train.prompts_per_step=2", "--set",
             "rollout.num_generations=2", "--set", "output.plots=false"]
    return {
        "diagnose": ["diagnose", c, "--json", "--set", "data.num_prompts=4", "--set", "rollout.max_new_tokens=12",
                     "--set", "rollout.num_generations=2", "--set", "output.plots=false", "--out", "diag"],
        "eval": ["eval", c, "--json", "--set", "eval.toy_num_problems=4", "--set", "rollout.max_new_tokens=12",
                 "--set", "rollout.num_generations=2", "--out", "ev"],
        "rl": ["rl", c, "--json", "--max-steps", "2", *small, "--set", "grpo.reward=tests.rewards:even_length",
               "--out", "rl"],
        "reheat": ["reheat", c, "--json", "--max-steps", "2", *small, "--set", "reheat.report_prompts=2",
                   "--out", "rh"],
        "fold": ["reheat", c, "--json", "--method", "fold", "--temp", "1.6", "--out", "fold"],
    }


def tiny_checkpoint(path: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(path)


def take(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tsopsd_cli.recipe import RECIPES

    snap: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for cmd in COMMANDS:
            snap["help " + " ".join(cmd)] = error_case(run([*cmd, "--help"], tmp))
        for name, cls in RECIPES.items():
            snap[f"recipe show {name}"] = error_case(run(["recipe", "show", name], tmp))
            snap[f"schema {name}"] = {"schema": cls.model_json_schema()}
        shipped = sorted(p for p in (ROOT / "recipes").rglob("*.yaml"))
        snap["recipe validate shipped"] = error_case(run(["recipe", "validate", *map(str, shipped)], tmp))
        for p in shipped:
            if p.parent.name in ("rl", "reheat") and "qwen3" in p.name:
                snap[f"plan {p.relative_to(ROOT)}"] = json_case(run(["plan", str(p), "--gpus", "8", "--json"], tmp))
        ckpt = tiny_checkpoint(tmp / "tiny")
        for name, args in bad_inputs(tmp, ckpt).items():
            snap[f"bad {name}"] = error_case(run(args, tmp))
        for name, args in short_runs(ckpt).items():
            snap[f"run {name}"] = json_case(run(args, tmp, env={"OMP_NUM_THREADS": "1"}))
    out.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    print(f"{len(snap)} cases -> {out}")


def compare(a: Path, b: Path) -> int:
    left, right = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for key in sorted(set(left) | set(right)):
        if left.get(key) != right.get(key):
            bad += 1
            print(f"differs: {key}")
            la, rb = json.dumps(left.get(key), sort_keys=True), json.dumps(right.get(key), sort_keys=True)
            i = next((k for k, (x, y) in enumerate(zip(la, rb)) if x != y), min(len(la), len(rb)))
            print(f"  {a.name}: ...{la[max(0, i - 120):i + 200]}")
            print(f"  {b.name}: ...{rb[max(0, i - 120):i + 200]}")
    print(f"{len(set(left) | set(right))} cases, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "take":
        take(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
