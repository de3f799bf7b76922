"""Prompt sources (toy world, JSONL files) and graders."""

from __future__ import annotations

import json
from pathlib import Path

from tsopsd_cli.errors import DataError
from tsopsd_cli.tasks.base import Problem, answer_text


def load_problems(data, require_answers: bool = False) -> list[Problem]:
    """Problems for a recipe's `data` section."""
    if data.type == "toy":
        from tsopsd_cli.tasks import toy

        levels = tuple(sorted(set(data.levels)))
        return [p.to_problem(i) for i, p in
                enumerate(toy.make_problems(data.split, data.num_prompts, data.seed, levels))]
    if data.type in ("jsonl", "hub"):
        from tsopsd_cli.tasks.benchmarks import template_text

        template = template_text(data.prompt_template)
        rows = read_jsonl(data.path) if data.type == "jsonl" else hub_rows(data)
        source = data.path if data.type == "jsonl" else data.name
        if data.limit:
            rows = rows[:data.limit]
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
                if not answer and require_answers:  # null, [] or "": no gold to grade against ("None" would grade \boxed{None} correct)
                    empty.append(n)
            pid = str(row[data.id_field]) if data.id_field and data.id_field in row else str(n - 1)
            out.append(Problem(id=pid, prompt=template.format(question=row[data.question_field]), answer=answer))
        if empty:
            raise DataError(f"{source}: {len(empty)} of {len(rows)} rows have an empty {data.answer_field!r} (null, [] "
                            f"or \"\"; first at line {empty[0]}): remove them or fill in their answers")
        return out
    raise DataError(f"unknown data type {data.type!r}")


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


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file; one clear DataError for a missing file or a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
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
