"""runners.jobs: independent runs side by side in worker processes, one thread each; done ones skipped; a failure
or a signal stops the others at their next safe point."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tsopsd_cli import signals
from tsopsd_cli.errors import DataError, Interrupted
from tsopsd_cli.runners.jobs import Job, run_jobs


def write_after(target: str, seconds: float = 0.0) -> None:
    import torch

    time.sleep(seconds)
    Path(target).write_text(f"{os.getpid()} {torch.get_num_threads()}")


def fail(target: str) -> None:
    raise DataError(f"{target}: bad data")


def wait_for_signal(target: str) -> None:
    Path(target + ".started").write_text("")
    for _ in range(600):
        signals.check("the test job")
        time.sleep(0.05)
    Path(target).write_text("never interrupted")


def jobs(tmp_path, fn, n, **kwargs):
    return [Job(f"job {i}", tmp_path / f"out-{i}", f"{__name__}:{fn}", {"target": str(tmp_path / f"out-{i}"),
                                                                          **kwargs}) for i in range(n)]


def test_side_by_side_one_thread_each_and_done_ones_skipped(tmp_path):
    (tmp_path / "out-0").write_text("kept")
    lines = []
    seconds = run_jobs(jobs(tmp_path, "write_after", 4, seconds=0.2), workers=2, log=lines.append)
    assert set(seconds) == {"job 1", "job 2", "job 3"}
    assert (tmp_path / "out-0").read_text() == "kept" and any("done before, kept" in x for x in lines)
    written = [(tmp_path / f"out-{i}").read_text().split() for i in (1, 2, 3)]
    assert {threads for _, threads in written} == {"1"}  # one thread each
    assert all(pid != str(os.getpid()) for pid, _ in written)  # in worker processes
    assert run_jobs(jobs(tmp_path, "write_after", 4), workers=2, log=lines.append) == {}  # all done: nothing runs


def test_one_worker_runs_here_in_order(tmp_path):
    seconds = run_jobs(jobs(tmp_path, "write_after", 2), workers=1, log=lambda m: None)
    assert list(seconds) == ["job 0", "job 1"]
    assert (tmp_path / "out-0").read_text().split()[0] == str(os.getpid())


def test_a_failing_job_raises_its_error_with_its_exit_code(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(Exception) as err:
        run_jobs(jobs(tmp_path, "write_after", 2, seconds=0.5) + jobs(tmp_path / "x", "fail", 1), workers=2,
                 log=lambda m: None)
    assert err.value.exit_code == DataError.exit_code and "bad data" in str(err.value)
    assert str(err.value).startswith("job 0: ") and "x/out-0: bad data" in str(err.value)


def test_a_signal_is_forwarded_and_every_worker_stops_at_a_safe_point(tmp_path):
    def signal_once_both_run():
        while len(list(tmp_path.glob("*.started"))) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_both_run, daemon=True).start()
    try:
        with signals.installed(), pytest.raises(Interrupted, match="SIGTERM received"):
            run_jobs(jobs(tmp_path, "wait_for_signal", 2), workers=2, log=lambda m: None)
    finally:
        signals._requested = None  # this process's flag: the tests after this one run commands in it
    assert not list(tmp_path.glob("out-?"))  # neither job finished: both stopped at their safe point
