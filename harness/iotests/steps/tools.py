"""Steps that run external programs on the target: qemu-io, qemu-img, dd, fio ...

Each runs within the instance's budget (Session.tool): a program that
overruns is a bounded-wait report with its kernel stack, not a harness error.
"""

from __future__ import annotations

import json
from typing import Any

from ...options import boolean, choice
from ..context import onoff
from .session import Session
from .vocabulary import Fields, integer, step, text, texts


@step("qemu-io", scalar=texts, metavar="CMD or [CMD, ...]", tools=("qemu-io",))
def _qemu_io(s: Session, cmds: list[str]) -> None:
    """Run the real qemu-io (-f raw) with these -c commands on the target."""
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", s.expand(c)]
    _run_tool(s, [*argv, str(s.target)], "qemu-io")


@step("qemu-img", scalar=text, metavar="ARGS", tools=("qemu-img",))
def _qemu_img(s: Session, args: str) -> None:
    """Run the real qemu-img with these arguments ($TARGET, $IMAGE, $TEST_DIR expanded)."""
    _run_tool(s, ["qemu-img", *s.expand(args).split()], "qemu-img")


@step("chmod", scalar=text, metavar="MODE")
def _chmod(s: Session, mode: str) -> None:
    """Run chmod(1) with a mode (u+x, 0600) on the target; print its errors and status."""
    _run_tool(s, ["chmod", mode, str(s.target)], "chmod")


def _run_tool(s: Session, argv: list[str], name: str) -> None:
    res = s.tool(argv)
    for line in (res.stdout + res.stderr).splitlines():
        s.log(line)
    if res.returncode:
        s.log(f"{name}: exit {res.returncode}")


@step("dd", scalar=text, metavar="OPERANDS")
def _dd(s: Session, args: str) -> None:
    """Run dd with these operands ($TARGET, $IMAGE, $TEST_DIR expanded); print its report."""
    res = s.tool(["dd", *s.expand(args).split()])
    for line in res.stderr.splitlines():
        s.log(line)
    s.log(f"dd: exit {res.returncode}")


FIO_FIELDS: Fields = {
    "rw": (choice("read", "write", "randread", "randwrite", "rw", "randrw"), True),
    "bs": (text, True),
    "size": (text, True),
    "offset": (text, False),
    "iodepth": (integer, False),
    "numjobs": (integer, False),
    "ioengine": (choice("libaio", "io_uring", "psync"), False),
    "direct": (boolean, False),
    "verify": (choice("crc32c", "md5", "pattern"), False),
}


@step("fio", FIO_FIELDS, tools=("fio",))
def _fio(s: Session, a: dict[str, Any]) -> None:
    """Run fio on the target; print the job, exit status, error count and bytes moved."""
    argv = [
        "fio",
        "--name=case",
        f"--filename={s.target}",
        f"--rw={a['rw']}",
        f"--bs={a['bs']}",
        f"--size={a['size']}",
        f"--iodepth={a.get('iodepth', 1)}",
        f"--numjobs={a.get('numjobs', 1)}",
        f"--ioengine={a.get('ioengine', 'libaio')}",
        f"--direct={int(a.get('direct', True))}",
        "--group_reporting",
        "--output-format=json",
    ]
    if "offset" in a:
        argv.append(f"--offset={a['offset']}")
    if "verify" in a:
        argv += [
            f"--verify={a['verify']}",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ]
        # Jobs verifying one region would overwrite each other's data.
        argv.append(f"--offset_increment={a['size']}")
    res = s.tool(argv, cwd=s.ctx.workdir)
    desc = " ".join(f"{k}={onoff(v)}" for k, v in a.items())
    try:
        job = json.loads(res.stdout[res.stdout.index("{") :])["jobs"][0]
        summary = (
            f"errors={job['error']} read={job['read']['io_bytes']} "
            f"written={job['write']['io_bytes']}"
        )
    except (ValueError, KeyError, IndexError):
        summary = "no report: " + (res.stderr.strip().splitlines() or ["?"])[-1]
    s.log(f"fio {desc}: exit {res.returncode} {summary}")


@step("df", export=True)
def _df(s: Session, _: None) -> None:
    """Run df on the target; print its errors and exit status (not authoritative)."""
    res = s.tool(["df", str(s.target)])
    for line in res.stderr.splitlines():
        s.log(line)
    s.log(f"df: exit {res.returncode}")
