"""Command-line plumbing shared by the exporter and the tools."""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

# What a shell reports for a writer whose reader went away (`| head`): the
# status of a process that SIGPIPE killed.  Python ignores SIGPIPE, so a
# closed pipe is a BrokenPipeError, which run_tool() turns into this.
PIPE_CLOSED = 128 + signal.SIGPIPE


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and status 1, like every other bad input.
        self.exit(1, f"{self.prog}: {message}\n")


def reader_gone(fd: int) -> bool:
    """fd is a pipe (or socket) whose reading end is closed."""
    p = select.poll()
    p.register(fd, 0)  # POLLERR and POLLHUP are reported whatever the mask
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


def run_tool(main: Callable[[], int | str | None]) -> NoReturn:
    """sys.exit(main()), but quietly with PIPE_CLOSED once nobody reads our
    output (tools/check -n | head -1).  A broken pipe of anything else, such
    as a child's stdin, is an error like any other and keeps its traceback."""
    try:
        try:
            status = main()
        except SystemExit as e:  # argparse's --help and errors
            status = e.code
        sys.stdout.flush()  # here, not at exit, where it could only warn
    except BrokenPipeError:
        closed = [fd for fd in (1, 2) if reader_gone(fd)]
        if not closed:
            raise
        # What is still buffered must not fail again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in closed:
            os.dup2(devnull, fd)
        sys.exit(PIPE_CLOSED)
    sys.exit(status)
