"""The idle client, tools/stress --repeat's outcomes, and whose verdict a hang gets."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness.iotests.client import ClientPool, start_client
from harness.iotests.stress import outcome


def test_an_idle_client_holds_the_file_until_told_then_reads_and_closes(tmp_path: Path) -> None:
    target = tmp_path / "img"
    target.write_bytes(b"\x5c" * 8192)
    p = start_client("idle", target, stdin=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "open"
        assert p.poll() is None  # idle: still holding it open
        fds = [f.resolve() for f in Path(f"/proc/{p.pid}/fd").iterdir() if f.exists()]
        assert target in fds
        ClientPool.go_on(p)
        assert ClientPool.result(p) == "read ok 4096, close ok"
    finally:
        p.kill()
        p.wait()


def test_an_idle_client_that_cannot_open_says_why(tmp_path: Path) -> None:
    p = start_client("idle", tmp_path / "missing", stdin=subprocess.PIPE)
    ClientPool.go_on(p)
    assert ClientPool.result(p) == "error ENOENT"


def test_repeat_outcomes() -> None:
    wait = "bounded wait: step 'wait' (line 13): timed out after 24.9s waiting for client c"
    hung = {"status": "fail", "reason": wait, "bad": "", "output": "x"}
    # the same hang with other numbers is one outcome; a listed one names its entry
    assert outcome(hung) == outcome({**hung, "reason": wait.replace("24.9", "23.1")})
    listed = {**hung, "status": "xfail", "reason": f"known defect, known/q.yaml:66: r\n{wait}"}
    assert outcome(listed).startswith("xfail (known defect, known/q.yaml:66) bounded wait")
    mismatch = {"status": "fail", "reason": "output mismatch", "bad": "b", "output": "A\n"}
    assert outcome(mismatch) != outcome({**mismatch, "output": "B\n"})
    assert outcome({"status": "pass"}) == "pass"
    assert (
        outcome({"status": "not run", "reason": "no io-uring=auto"}) == "not run: no io-uring=auto"
    )


def test_a_wait_that_ran_out_first_gives_the_verdict(tmp_path: Path) -> None:
    """The runner's own timeout must not cut short the report of a bounded
    wait that already gave up (gdb on a loaded machine is slow): under load
    the same hang would otherwise be two outcomes."""
    import time

    from harness.iotests.context import CaseContext, Instance
    from harness.iotests.runner import _run_with_timeout

    ctx = CaseContext(Instance("demo", "fuse", "legacy"), tmp_path)
    ctx.diagnose(lambda: time.sleep(1.0) or "slow report")
    error, _ = _run_with_timeout(lambda: ctx.wait(lambda: False, "never", 0.2), ctx, 0.5)
    assert error.startswith("bounded wait: timed out after 0.2s waiting for never\nslow report")
