"""Answer extraction and grading.

1. Extract: the last `\\boxed{...}` or `\\fbox{...}` with brace matching (math-verify would join several boxes
   close together: "\\boxed{3} ... \\boxed{204}" parses as 3204); else `#### n`; else `Answer: x`.
2. Fast path: equal after light normalisation (spaces, `$`, trailing `.`, `27.0` = `27`, `025` = `25`).
3. Otherwise math-verify, with the gold wrapped in `\\boxed{}` (it is not symmetric: gold first), in worker
   processes under a wall-clock limit per answer. math-verify's own timeouts use `signal.alarm`, which only works
   on the main thread; a worker that overruns is killed and the answer graded wrong (and reported as timed out).
"""

from __future__ import annotations

import multiprocessing as mp
import re
from dataclasses import dataclass

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_RE = re.compile(r"(?i)answer\s*(?:is)?\s*[:：]\s*([^\n]+)")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}`, braces matched; None if there is none."""
    last = None
    for m in _BOX_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            last = text[m.end():i - 1]
    return last


def extract_answer(text: str) -> str | None:
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for rx in (_HASH_RE, _ANSWER_RE):
        found = rx.findall(text)
        if found:
            return found[-1].strip().rstrip(".").strip("$ ").strip()
    return None


_NUM_RE = re.compile(r"[-+]?\d+(?:\.\d+)?")


def normalize(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\[,!;: ]", "", s)  # LaTeX thin spaces
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    while True:  # \text{...}, \textbf{(073)}, \mathrm{...} around the whole answer
        inner = re.sub(r"^\\(?:text|textbf|mathbf|mathrm)\{(.*)\}$", r"\1", s)
        if inner == s:
            break
        s = inner
    s = re.sub(r"^\(([-+]?\d+(?:\.\d+)?)\)$", r"\1", s)  # (073) -> 073; tuples are untouched
    t = s.replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s) else s  # 1,000 -> 1000
    if _NUM_RE.fullmatch(t):
        value = float(t)
        return str(int(value)) if value == int(value) else repr(value)
    return s


def _is_number(s: str) -> bool:
    return _NUM_RE.fullmatch(s) is not None


@dataclass
class Grade:
    correct: bool
    extracted: str | None
    timed_out: bool = False


def _verify(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def _worker(conn) -> None:
    import logging

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it warns on every call with timeouts off
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(_verify(*job))
        except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer
            conn.send(False)


class Grader:
    """Grades (completion, gold) pairs; slow cases go to `workers` processes, each answer with `timeout` s."""

    def __init__(self, workers: int = 2, timeout: float = 5.0):
        self.workers = max(1, workers)
        self.timeout = timeout
        self._procs: list[tuple[mp.Process, object]] = []
        self.timeouts = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for proc, conn in self._procs:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            proc.join(timeout=1)
            if proc.is_alive():
                proc.kill()
        self._procs = []

    def _spawn(self):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        return proc, parent

    def grade(self, completion: str, gold: str) -> Grade:
        return self.grade_many([(completion, gold)])[0]

    def grade_many(self, pairs: list[tuple[str, str]]) -> list[Grade]:
        results: list[Grade | None] = [None] * len(pairs)
        slow: list[int] = []
        for i, (completion, gold) in enumerate(pairs):
            pred = extract_answer(completion)
            if pred is None or not pred.strip():
                results[i] = Grade(False, pred)
            elif normalize(pred) == normalize(str(gold)):
                results[i] = Grade(True, pred)
            elif _is_number(normalize(pred)) and _is_number(normalize(str(gold))):
                results[i] = Grade(False, pred)  # two different plain numbers: no need for math-verify
            else:
                slow.append(i)
        if slow:
            self._grade_slow(pairs, slow, results)
        return results  # type: ignore[return-value]

    def _grade_slow(self, pairs, slow: list[int], results: list) -> None:
        import time
        from multiprocessing.connection import wait

        while len(self._procs) < min(self.workers, len(slow)):
            self._procs.append(self._spawn())
        queue = list(slow)
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (pair index, start time)
        while queue or busy:
            for slot in range(len(self._procs)):
                if slot not in busy and queue:
                    i = queue.pop(0)
                    gold, pred = str(pairs[i][1]), extract_answer(pairs[i][0])
                    self._procs[slot][1].send((gold, pred))
                    busy[slot] = (i, time.monotonic())
            conns = {self._procs[s][1]: s for s in busy}
            ready = wait(list(conns), timeout=0.05)
            for conn in ready:
                slot = conns[conn]
                i, _ = busy.pop(slot)
                try:
                    ok = bool(conn.recv())
                except EOFError:
                    ok = False
                    self._procs[slot] = self._spawn()
                results[i] = Grade(ok, extract_answer(pairs[i][0]))
            now = time.monotonic()
            for slot, (i, started) in list(busy.items()):
                if now - started > self.timeout:
                    proc, _ = self._procs[slot]
                    proc.kill()
                    proc.join()
                    self._procs[slot] = self._spawn()
                    busy.pop(slot)
                    self.timeouts += 1
                    results[i] = Grade(False, extract_answer(pairs[i][0]), timed_out=True)
