"""One fio cell, run from a job file kept in bench/ so it can be rerun by hand:

FIO_FILE=MOUNTPOINT FIO_RUNTIME=5 fio bench/qd1-jobs1.fio
"""

from __future__ import annotations

import configparser
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import runs
from ..lifecycle import REPO

JOBS_DIR = REPO / "bench"
# The seed's order; the last stdout line lists the ratios in this order.
CELL_NAMES = ("qd1-jobs1", "qd1-jobs4", "qd64-jobs1", "qd64-jobs4")
RAMP = 1.0  # the job files' ramp_time
# fio beyond runtime + ramp: start-up, the 1G layout check, exit.
OVERRUN = 60.0


class BenchError(Exception):
    """The benchmark could not measure (bad option, fio failed)."""


@dataclass(frozen=True)
class Cell:
    name: str
    iodepth: int
    numjobs: int
    jobfile: Path

    @property
    def label(self) -> str:
        return f"qd={self.iodepth} jobs={self.numjobs}"


@dataclass(frozen=True)
class Sample:
    """What fio measured in one run of one cell on one exporter."""

    iops: float  # read + write
    lat_us: float  # mean completion latency over both directions, weighted by IOPS
    read_iops: float
    write_iops: float
    p99_us: float  # the worse direction's 99th percentile latency (submit to completion)
    ios: int  # I/Os completed after the ramp

    def ios_spanned(self, runtime: float) -> float:
        """I/Os over the whole run, ramp included (fio does not count those):
        what counters read beside fio are divided by, at the measured rate."""
        return max(self.iops * (runtime + RAMP), 1.0)


def load_cell(name: str, jobs_dir: Path = JOBS_DIR) -> Cell:
    path = jobs_dir / f"{name}.fio"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(jobs_dir.glob("*.fio")))
        raise BenchError(f"no cell {name!r}: no {path} (cells: {known})")
    parser = configparser.ConfigParser(interpolation=None, allow_no_value=True)
    try:
        parser.read_string(path.read_text(), str(path))
    except configparser.Error as e:
        raise BenchError(f"{path}: not a fio job file: {str(e).splitlines()[0]}") from None
    jobs = [s for s in parser.sections() if s != "global"]
    if len(jobs) != 1:
        raise BenchError(f"{path}: expected one job section, found {len(jobs)}")
    try:
        job = parser[jobs[0]]
        return Cell(name, int(job["iodepth"]), int(job["numjobs"]), path)
    except (KeyError, ValueError) as e:
        raise BenchError(f"{path}: iodepth and numjobs must be integers ({e})") from None


def load_cells(names: list[str] | None = None) -> list[Cell]:
    return [load_cell(n) for n in names or CELL_NAMES]


def parse_output(text: str) -> Sample:
    """fio --output-format=json of a group_reporting job."""
    job = json.loads(text)["jobs"][0]
    rd, wr = job["read"], job["write"]
    iops = rd["iops"] + wr["iops"]
    lat = (rd["lat_ns"]["mean"] * rd["iops"] + wr["lat_ns"]["mean"] * wr["iops"]) / max(iops, 1)

    def p99(d: dict[str, Any]) -> float:
        return float(d["lat_ns"].get("percentile", {}).get("99.000000", 0.0))

    return Sample(
        iops=iops,
        lat_us=lat / 1000,
        read_iops=rd["iops"],
        write_iops=wr["iops"],
        p99_us=max(p99(rd), p99(wr)) / 1000,
        ios=int(rd["total_ios"] + wr["total_ios"]),
    )


def run_cell(cell: Cell, path: Path, runtime: float) -> Sample:
    env = {**os.environ, "FIO_FILE": str(path), "FIO_RUNTIME": f"{runtime:g}"}
    res = runs.run(
        ["fio", "--output-format=json", str(cell.jobfile)],
        timeout=runtime + RAMP + OVERRUN,
        env=env,
    )
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise BenchError(f"fio {cell.name} on {path} failed ({res.returncode}): {' / '.join(tail)}")
    try:
        return parse_output(res.stdout)
    except (ValueError, KeyError, IndexError) as e:
        raise BenchError(f"fio {cell.name}: unreadable JSON output ({e})") from None
