"""Prompt sources (toy world, named math benchmarks, JSONL files, hub data sets) behind one registry keyed by a
recipe's `data.type`, and graders."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

from tsopsd_cli.errors import DataError
from tsopsd_cli.tasks.base import Problem, answer_text, apply_chat_template, question_text, render_template


class PromptSource(Protocol):
    """One kind of prompt source: a recipe's `data` section of one `type` (recipe.DataSection's tags)."""

    def load(self, data, tokenizer, limit: int | None, require_answers: bool) -> list[Problem]:
        """The section's problems, the first `limit` when given. `tokenizer`: None, or the checkpoint's when the
        section's `chat_template` is on. `require_answers`: refuse rows whose gold answer is empty."""

    def name(self, data) -> str:
        """A short name of the source (the key of its validation metrics)."""


# data.type -> its source. Adding a source: a class with `load` and `name`, one `register(...)` line below, and the
# recipe's DataSection member with the same `type` tag (tests/unit/test_registry_lists.py holds them together).
_SOURCES: dict[str, PromptSource] = {}


def register(type_: str, source: PromptSource) -> None:
    _SOURCES[type_] = source


def source_types() -> list[str]:
    return list(_SOURCES)


def prompt_source(type_: str) -> PromptSource:
    if type_ not in _SOURCES:
        raise DataError(f"unknown data type {type_!r}")
    return _SOURCES[type_]


class ToySource:
    """The built-in toy world's problems (always its own prompt format)."""

    def load(self, data, tokenizer, limit, require_answers):
        from tsopsd_cli.tasks import toy

        levels = tuple(sorted(set(data.levels)))
        num = min(data.num_prompts, limit) if limit else data.num_prompts  # a draw of `limit` problems
        families = tuple(data.families)
        return [p.to_problem(i) for i, p in enumerate(toy.make_problems(data.split, num, data.seed, levels,
                                                                        families=families))]

    def name(self, data):
        return "toy"


class BenchmarkSource:
    """A named math benchmark, loaded as `tsopsd eval` loads it."""

    def load(self, data, tokenizer, limit, require_answers):
        from tsopsd_cli.tasks.benchmarks import load_benchmark, template_text

        n = min(x for x in (data.limit, limit) if x) if (data.limit or limit) else None
        return load_benchmark(data.name, data.data_dir, template_text(data.prompt_template), n,
                              chat_tokenizer=tokenizer)

    def name(self, data):
        return data.name


def row_problems(data, rows: list[dict], source, tokenizer, limit: int | None,
                 require_answers: bool) -> list[Problem]:
    """Problems from records (a JSONL file's lines, a hub data set's rows), each a question, a gold answer and an id
    by the section's field names; `source` names where they come from in error messages."""
    from tsopsd_cli.tasks.benchmarks import template_text

    template = template_text(data.prompt_template)
    for cap in (data.limit, limit):
        if cap:
            rows = rows[:cap]
    out = []
    empty: list[int] = []
    for n, row in enumerate(rows, 1):
        if data.question_field not in row:
            raise DataError(f"{source}:{n}: no field {data.question_field!r} (set data.question_field)")
        answer = None
        if data.answer_field is not None:
            if data.answer_field not in row:
                raise DataError(f"{source}:{n}: no field {data.answer_field!r} (set data.answer_field)")
            answer = answer_text(row[data.answer_field]) if row[data.answer_field] is not None else ""
            # null, [] or "": no gold to grade against ("None" would grade \boxed{None} correct)
            if not answer and require_answers:
                empty.append(n)
        pid = str(row[data.id_field]) if data.id_field and data.id_field in row else str(n - 1)
        question = question_text(row[data.question_field], f"{source}:{n}", repr(data.question_field))
        prompt = render_template(template, question)
        if tokenizer is not None:
            prompt = apply_chat_template(tokenizer, prompt)
        out.append(Problem(id=pid, prompt=prompt, answer=answer))
    if empty:
        raise DataError(f"{source}: {len(empty)} of {len(rows)} rows have an empty {data.answer_field!r} (null, [] "
                        f"or \"\"; first at line {empty[0]}): remove them or fill in their answers")
    return out


def _file_name(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw) or "data"


class JsonlSource:
    """A local JSON-lines file."""

    def load(self, data, tokenizer, limit, require_answers):
        return row_problems(data, read_jsonl(data.path), data.path, tokenizer, limit, require_answers)

    def name(self, data):
        return _file_name(Path(data.path).stem)


class HubSource:
    """A Hugging Face hub data set (needs `datasets` and network)."""

    def load(self, data, tokenizer, limit, require_answers):
        return row_problems(data, hub_rows(data), data.name, tokenizer, limit, require_answers)

    def name(self, data):
        return _file_name(data.name.rsplit("/", 1)[-1])


register("toy", ToySource())
register("benchmark", BenchmarkSource())
register("jsonl", JsonlSource())
register("hub", HubSource())


def load_problems(data, tokenizer=None, limit: int | None = None, require_answers: bool = False) -> list[Problem]:
    """Problems for a recipe's `data` section, the first `limit` of them when given. `tokenizer`: the checkpoint's,
    needed when the section's `chat_template` is on (each prompt becomes one user turn of its chat template).
    `require_answers`: refuse rows whose gold answer is empty (null, [] or "")."""
    chat = getattr(data, "chat_template", False)
    if chat and tokenizer is None:
        raise ValueError("load_problems: chat_template is on; pass the checkpoint's tokenizer")
    return prompt_source(data.type).load(data, tokenizer if chat else None, limit, require_answers)


def source_name(data) -> str:
    """A short name of a prompt source (the key of its validation metrics): toy, the benchmark's name, or the
    file's or data set's stem."""
    return prompt_source(data.type).name(data)


def validation_sets(section, data, tokenizer, limit: int | None = None) -> dict[str, list[Problem]]:
    """The problem sets a training run validates on (and reheat's before/after report samples from, with
    `limit=reheat.report_prompts`, which replaces `section.limit`): `section.benchmarks` when the recipe names
    them; otherwise the run's own prompt source `data` (toy data: the toy test problems, so that validation is on
    problems the run does not train on; any other source: its first `section.limit` problems, with the same
    template and chat setting as training)."""
    from tsopsd_cli.tasks.benchmarks import load_benchmark, template_text

    n = limit or section.limit
    if section.benchmarks is None and data.type != "toy":
        return {source_name(data): load_problems(data, tokenizer, n)}
    names = section.benchmarks if section.benchmarks is not None else ["toy"]
    chat = tokenizer if getattr(section, "chat_template", False) else None
    template = template_text(section.prompt_template)
    return {name: load_benchmark(name, section.data_dir, template, n, toy_num=n or 200, toy_seed=0,
                                 chat_tokenizer=chat, toy_split=getattr(section, "toy_split", "test"))
            for name in names}


def right_plan(problem: Problem, completion) -> bool | None:
    """Whether a completion (text or token ids) chose its problem's right plan at its decision point (the toy
    world's plan letter); None where a task has no single right plan (neutral toy problems, the math benchmarks)."""
    if "family" not in problem.meta:
        return None
    from tsopsd_cli.tasks import toy

    return toy.right_plan(problem, completion)


def decision_positions(problem: Problem, token_ids: list[int]) -> list[int] | None:
    """The completion-token indices a task marks as decision points (the toy world's plan letter), or None for
    tasks that mark none (the math benchmarks)."""
    if "family" not in problem.meta:
        return None
    from tsopsd_cli.tasks import toy

    return toy.decision_positions(problem, token_ids)


def hub_rows(data) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.type hub needs the `datasets` package to load {data.name}") from None
    try:
        return [dict(r) for r in datasets.load_dataset(data.name, data.config, split=data.split)]
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot load {data.name} from the hub ({str(e).splitlines()[0][:200]})") from None


def require_file(path: str | Path) -> Path:
    """`path` as a Path; one clear DataError when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file; one clear DataError for a missing file or a bad line."""
    path = require_file(path)
    rows = []
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    for n, blob in enumerate(raw.split(b"\n"), 1):
        try:
            line = blob.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{n}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: each line must be a JSON object")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no records")
    return rows
