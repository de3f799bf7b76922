"""Answer extraction and grading.

1. Extract: the last complete `\\boxed{...}` or `\\fbox{...}` with brace matching (math-verify would join several boxes
   close together: "\\boxed{3} ... \\boxed{204}" parses as 3204); else the last `#### x` line; else the last
   `Answer: x` / `answer is: x` line. Extraction is one pass, linear in the completion's length (restarting a brace
   scan at every `\\boxed{` took minutes on a completion of repeated unclosed boxes), so the whole completion is
   searched: it is not cut to its last N characters, which would miss a box opened before the cut and closed after.
2. Fast path: equal after light normalisation (spaces, `$`, trailing `.`, `\\text{}` around the answer, `27.0` = `27`,
   `025` = `25`). Plain numbers are compared as canonical text, never through float/int, which are inexact past 16
   digits, overflow past 308 and refuse past 4300; two different plain numbers are wrong without math-verify.
3. Otherwise math-verify, with the gold wrapped in `\\boxed{}` (it is not symmetric: gold first), in worker
   processes under a wall-clock limit per answer. math-verify's own timeouts use `signal.alarm`, which only works
   on the main thread; a worker that overruns is killed and the answer graded wrong (and reported as timed out).
   An extracted answer longer than `MAX_VERIFY_CHARS` (1,000) characters is never sent to math-verify: it is graded
   by its normalised text alone (step 2). No benchmark answer comes near (MATH-500's longest is 53), and sympy on
   tens of thousands of characters of LaTeX would only spend the time limit.
   Workers ignore SIGINT and SIGTERM (the job's whole process group gets them; the parent decides when to stop), end
   quietly when the parent's pipe closes, and on Linux are killed with the parent if it dies without closing them.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.util
import re
from dataclasses import dataclass

MAX_VERIFY_CHARS = 1000  # longer extracted answers are graded by normalised text only (see the module docstring)

# None of these backtracks more than linearly (`answer` + 50k spaces took 13 s with two adjacent `\s*`). Possessive
# quantifiers would say so more directly, but they need Python 3.11 and the package supports 3.10.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"[{}]")
_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_RE = re.compile(r"(?i)answer(?:\s*is)?\s*[:：]\s*([^\n]+)")  # = answer\s*(?:is)?\s*[:：], without the
# two adjacent `\s*` that split a run of spaces in every possible way before failing


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}`, braces matched; None if there is none."""
    # One pass over the braces with a stack of the open ones: each `}` closes the innermost open `{`, so a box is
    # complete when its own `{` is popped, and its content runs to that `}`. Braces before the first box cannot close
    # one (they are below it on the stack), so the scan starts there. "Last" is the box opened last.
    openers = {m.end() - 1 for m in _BOX_RE.finditer(text)}  # where each box's `{` is
    if not openers:
        return None
    stack: list[int] = []
    best, best_end = -1, -1
    for m in _BRACE_RE.finditer(text, min(openers)):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:  # a `}` with nothing open closes nothing
            j = stack.pop()
            if j > best and j in openers:
                best, best_end = j, i
    return text[best + 1:best_end] if best >= 0 else None


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
_WRAPPERS = ("\\text{", "\\textbf{", "\\mathbf{", "\\mathrm{")


def _canonical_number(t: str) -> str:
    """`[-+]?\\d+(\\.\\d+)?` as text: `+5` -> `5`, `025` -> `25`, `27.0` -> `27`, `-0.0` -> `0`, exact at any length."""
    negative = t.startswith("-")
    whole, _, frac = t.lstrip("+-").partition(".")
    out = (whole.lstrip("0") or "0") + ("." + frac.rstrip("0") if frac.rstrip("0") else "")
    return "-" + out if negative and out != "0" else out


def normalize(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\[,!;: ]", "", s)  # LaTeX thin spaces
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    # \text{...}, \textbf{(073)}, \mathrm{...} around the whole answer, as many layers as there are: a wrapper at the
    # start and a `}` at the end (not necessarily its own brace). Moving two ends inward keeps this linear; one regex
    # substitution over the whole string per layer was quadratic in the nesting depth.
    lo, hi = 0, len(s)
    while hi > lo and s[hi - 1] == "}":
        w = next((w for w in _WRAPPERS if s.startswith(w, lo, hi - 1)), None)
        if w is None:
            break
        lo, hi = lo + len(w), hi - 1
    s = s[lo:hi]
    s = re.sub(r"^\(([-+]?\d+(?:\.\d+)?)\)$", r"\1", s)  # (073) -> 073; tuples are untouched
    t = s.replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s) else s  # 1,000 -> 1000
    if _NUM_RE.fullmatch(t):
        return _canonical_number(t)
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


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when its parent dies (a worker ignores SIGTERM, and one busy in a
    runaway sympy computation would otherwise outlive a parent killed without closing it). Elsewhere: nothing.
    (Strictly, when the parent *thread* that started it ends: a worker lost that way is respawned on the next send.)"""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os._exit(0)


def _worker(conn) -> None:
    import logging
    import signal

    # A job's SIGINT/SIGTERM reaches the whole process group. The parent decides when to stop and ends its workers on
    # close; a worker that acted on the signal itself printed a KeyboardInterrupt or (once the parent was gone)
    # EOFError traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it warns on every call with timeouts off
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone: nobody to answer
            return
        if job is None:
            return
        try:
            ok = _verify(*job)
        except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer
            ok = False
        try:
            conn.send(ok)
        except OSError:
            return


def _stop_workers(procs: list) -> None:
    """Ask every worker to stop, give them a second, kill the rest. Empties `procs` (a Grader's own list)."""
    for _, conn in procs:
        try:
            conn.send(None)
        except OSError:  # it is dead already
            pass
    for proc, conn in procs:
        proc.join(timeout=1)
        if proc.is_alive():  # busy on an answer: SIGKILL, since workers ignore SIGTERM
            proc.kill()
            proc.join()
        conn.close()
    procs.clear()


class Grader:
    """Grades (completion, gold) pairs; slow cases go to `workers` processes, each answer with `timeout` s."""

    def __init__(self, workers: int = 2, timeout: float = 5.0):
        self.workers = max(1, workers)
        self.timeout = timeout
        self._procs: list[tuple[mp.Process, object]] = []
        self.timeouts = 0
        # A Grader never closed (a crash, a caller that forgot) must not keep its workers: at exit multiprocessing
        # would SIGTERM them (ignored) and then join them forever. This runs before that, or when the Grader is freed.
        multiprocessing.util.Finalize(self, _stop_workers, args=(self._procs,), exitpriority=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        _stop_workers(self._procs)

    def _spawn(self):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        child.close()  # the worker's end lives in the worker: its recv() then sees EOF once the parent's end closes
        return proc, parent

    def _respawn(self, slot: int) -> None:
        proc, conn = self._procs[slot]
        if proc.is_alive():
            proc.kill()
        proc.join()
        conn.close()
        self._procs[slot] = self._spawn()

    def grade(self, completion: str, gold: str) -> Grade:
        return self.grade_many([(completion, gold)])[0]

    def grade_many(self, pairs: list[tuple[str, str]]) -> list[Grade]:
        results: list[Grade | None] = [None] * len(pairs)
        preds: list[str | None] = []
        slow: list[int] = []
        for i, (completion, gold) in enumerate(pairs):
            pred = extract_answer(completion)
            preds.append(pred)
            if pred is None or not pred.strip():
                results[i] = Grade(False, pred)
                continue
            p, g = normalize(pred), normalize(str(gold))
            if p == g:
                results[i] = Grade(True, pred)
            elif _is_number(p) and _is_number(g):
                results[i] = Grade(False, pred)  # two different plain numbers: no need for math-verify
            elif len(pred) > MAX_VERIFY_CHARS:
                results[i] = Grade(False, pred)  # too long for math-verify: its text was all there was to compare
            else:
                slow.append(i)
        if slow:
            self._grade_slow(pairs, preds, slow, results)
        return results  # type: ignore[return-value]

    def _grade_slow(self, pairs, preds: list, slow: list[int], results: list) -> None:
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
                    job = (str(pairs[i][1]), preds[i])
                    try:
                        self._procs[slot][1].send(job)
                    except OSError:  # the worker died while idle (killed from outside): a fresh one takes the job
                        self._respawn(slot)
                        self._procs[slot][1].send(job)
                    busy[slot] = (i, time.monotonic())
            conns = {self._procs[s][1]: s for s in busy}
            ready = wait(list(conns), timeout=0.05)
            for conn in ready:
                slot = conns[conn]
                i, _ = busy.pop(slot)
                try:
                    ok = bool(conn.recv())
                except (EOFError, OSError):  # the worker died on this answer
                    ok = False
                    self._respawn(slot)
                results[i] = Grade(ok, preds[i])
            now = time.monotonic()
            for slot, (i, started) in list(busy.items()):
                if now - started > self.timeout:
                    self._respawn(slot)
                    busy.pop(slot)
                    self.timeouts += 1
                    results[i] = Grade(False, preds[i], timed_out=True)
