"""Math benchmarks by name: loaders (local JSONL/parquet, or the Hugging Face hub through `datasets`), field
mappings, gold-answer normalisers and the prompt templates the field uses."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tsopsd_cli.errors import DataError, MissingDependencyError
from tsopsd_cli.tasks.base import Problem, answer_text, apply_chat_template, question_text, render_template
from tsopsd_cli.tasks.grading import extract_boxed

# Templates are plain text in which `{question}` is replaced (tasks.base.render_template); no other brace is special.
PROMPT_TEMPLATES = {
    # Qwen2.5-Math / DeepSeek-R1 / DAPO style: the one most math-RL papers report with.
    "boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    # SimpleRL-Zoo / Open-Reasoner base-model style, for models without a chat template.
    "qa-boxed": "Question:\n{question}\nPlease reason step by step, and put your final answer within "
                "\\boxed{}.\nAnswer:\n",
    "plain": "{question}",
}
# The template of every prompt source (eval, diagnose, rl/reheat data, validation) unless a recipe names another
DEFAULT_TEMPLATE = "boxed"


def _gold_gsm8k(value) -> str:
    text = str(value)
    if "####" in text:
        text = text.split("####")[-1]
    return text.strip().replace(",", "")


def _gold_dollar(value) -> str:
    return answer_text(value).strip("$").strip()


def _gold_from_solution(row: dict) -> str | None:
    sol = row.get("solution")
    return extract_boxed(sol) if isinstance(sol, str) else None


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    hub_id: str | None
    hub_config: str | None
    hub_split: str
    question_fields: tuple[str, ...]  # first present wins (hub and local copies name fields differently)
    answer_fields: tuple[str, ...]
    normalize_gold: Callable = answer_text
    local_names: tuple[str, ...] = ()  # file stems tried under --data-dir
    id_fields: tuple[str, ...] = ("id", "unique_id", "idx", "ID")


BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("aime24", "Maxwell-Jia/AIME_2024", None, "train", ("problem", "Problem", "question"),
                  ("answer", "Answer"), local_names=("aime24", "aime_2024")),
    BenchmarkSpec("aime25", "math-ai/aime25", None, "test", ("problem", "question"), ("answer",),
                  local_names=("aime25", "aime_2025")),
    BenchmarkSpec("amc23", "math-ai/amc23", None, "test", ("problem", "question"), ("answer",),
                  local_names=("amc23",)),
    BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", None, "test", ("problem",), ("answer",),
                  local_names=("math500", "math_500", "MATH-500")),
    BenchmarkSpec("gsm8k", "openai/gsm8k", "main", "test", ("question",), ("answer",), _gold_gsm8k,
                  local_names=("gsm8k",)),
    BenchmarkSpec("minerva_math", "math-ai/minervamath", None, "test", ("problem", "question"), ("answer",),
                  local_names=("minerva_math", "minervamath")),
    BenchmarkSpec("olympiadbench", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train",
                  ("question", "problem"), ("final_answer", "answer"), _gold_dollar,
                  local_names=("olympiadbench", "olympiad_bench")),
]}
# The toy world's test problems: `toy` the natural mix (a seeded draw), `toy-<family>` every test problem of one
# family (tasks.toy.family_problems, in a seeded order; the bracket family's 127 are the study's primary set).
TOY_SETS = {"toy": None, "toy-precedence": "precedence", "toy-bracket": "bracket", "toy-neutral": "neutral"}
NAMES = [*TOY_SETS, *BENCHMARKS]


def is_toy(name: str) -> bool:
    """Whether a benchmark name is one of the toy world's sets (its own prompt format: no template, no chat)."""
    return name in TOY_SETS
DEFAULT_BENCHMARK = "math500"  # what diagnose and eval sample on a checkpoint that is not a toy-world one


def parse_names(values: list[str]) -> list[str]:
    """`--benchmark a,b --benchmark c` -> [a, b, c], checked against the known names."""
    names = [v.strip() for item in values for v in item.split(",") if v.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise DataError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(NAMES)} "
                        "(or use --data FILE for a custom set)")
    return list(dict.fromkeys(names))


def _find_local(spec: BenchmarkSpec, data_dir: Path) -> Path | None:
    for stem in spec.local_names:
        for cand in (data_dir / f"{stem}.jsonl", data_dir / stem / "test.jsonl", data_dir / f"{stem}.parquet",
                     data_dir / stem / "test.parquet"):
            if cand.is_file():
                return cand
    return None


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingDependencyError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - a damaged or unreadable file: ArrowInvalid, OSError, ...
            raise DataError(f"{path}: cannot read as parquet ({str(e).splitlines()[0][:200]})") from None
    from tsopsd_cli.tasks import read_jsonl

    return read_jsonl(path)


def _hub_records(spec: BenchmarkSpec) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"benchmark {spec.name}: no local copy given (--data-dir) and the `datasets` package is "
                        f"not installed to fetch {spec.hub_id} from the Hugging Face hub") from None
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except Exception as e:  # noqa: BLE001 - network, auth, missing split...
        raise DataError(f"benchmark {spec.name}: cannot load {spec.hub_id} from the hub "
                        f"({str(e).splitlines()[0][:200]}); pass --data-dir with a local copy") from None
    return [dict(r) for r in ds]


def _pick(row: dict, fields: tuple[str, ...]):
    for f in fields:
        if f in row and row[f] not in (None, ""):
            return row[f]
    return None


def records_to_problems(name: str, rows: list[dict], question_fields, answer_fields, normalize_gold, id_fields,
                        template: str, source: str, chat_tokenizer=None) -> list[Problem]:
    """Problems of benchmark records; the prompt is `template` rendered with the question and, with
    `chat_tokenizer`, wrapped as one user turn of that tokenizer's chat template."""
    out = []
    for n, row in enumerate(rows):
        q = _pick(row, tuple(question_fields))
        if q is None:
            raise DataError(f"{source}: record {n}: no question (none of the fields {list(question_fields)} holds "
                            "a text)")
        q = question_text(q, f"{source}: record {n}", f"one of {list(question_fields)}")
        gold = _pick(row, tuple(answer_fields))
        gold = normalize_gold(gold) if gold is not None else _gold_from_solution(row)
        if gold is None or gold == "":
            raise DataError(f"{source}: record {n}: none of the answer fields {list(answer_fields)} present")
        pid = _pick(row, tuple(id_fields))
        prompt = render_template(template, q)
        if chat_tokenizer is not None:
            prompt = apply_chat_template(chat_tokenizer, prompt)
        out.append(Problem(id=f"{name}-{pid if pid is not None else n}", prompt=prompt, answer=gold,
                           meta={"question": q}))
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):  # ids must be unique for resuming; fall back to the record index
        out = [Problem(id=f"{name}-{n}", prompt=p.prompt, answer=p.answer, meta=p.meta) for n, p in enumerate(out)]
    return out


def load_benchmark(name: str, data_dir: Path | None, template: str, limit: int | None = None,
                   toy_num: int = 200, toy_seed: int = 0, chat_tokenizer=None,
                   toy_split: str = "test") -> list[Problem]:
    """Problems of a named benchmark. `template` is a text with {question} (ignored by the toy sets, whose prompts
    are the toy model's native format); `chat_tokenizer`: wrap each prompt in its chat template (not toy);
    `toy_split`: the toy sets' split (test; train for choices that must not look at test problems)."""
    if name in TOY_SETS:
        from tsopsd_cli.tasks import toy

        if TOY_SETS[name] is None:
            found = toy.make_problems(toy_split, toy_num, toy_seed)
        else:  # the whole family, shuffled by the seed, at most toy_num of it
            found = toy.family_problems(toy_split, TOY_SETS[name])
            random.Random(f"toy-set-{name}-{toy_seed}").shuffle(found)
            found = found[:toy_num]
        probs = [p.to_problem(i) for i, p in enumerate(found)]
        return probs[:limit] if limit else probs
    spec = BENCHMARKS[name]
    local = _find_local(spec, Path(data_dir)) if data_dir else None
    if data_dir and local is None:
        raise DataError(f"benchmark {name}: no {spec.local_names[0]}.jsonl (or .parquet, or "
                        f"{spec.local_names[0]}/test.jsonl) under {data_dir}")
    rows = read_records(local) if local else _hub_records(spec)
    problems = records_to_problems(name, rows, spec.question_fields, spec.answer_fields, spec.normalize_gold,
                                   spec.id_fields, template, str(local or spec.hub_id), chat_tokenizer)
    return problems[:limit] if limit else problems


def custom_name(path: Path) -> str:
    """The name a custom set (`eval --data FILE`) is reported under: its file's stem."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)


def load_custom(path: Path, question_field: str, answer_field: str, template: str,
                limit: int | None = None) -> list[Problem]:
    rows = read_records(Path(path))
    name = custom_name(path)
    problems = records_to_problems(name, rows, (question_field,), (answer_field,), answer_text,
                                   ("id", "unique_id", "idx"), template, str(path))
    return problems[:limit] if limit else problems


def template_text(name_or_text: str) -> str:
    """A template name from PROMPT_TEMPLATES, or a literal text containing {question} (used as written)."""
    text = PROMPT_TEMPLATES.get(name_or_text, name_or_text)
    if "{question}" not in text:
        raise DataError(f"prompt template {name_or_text!r} is neither a known name "
                        f"({', '.join(PROMPT_TEMPLATES)}) nor a text with {{question}}")
    return text


def dumps_problem(p: Problem) -> str:
    return json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer})
