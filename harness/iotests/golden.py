"""Golden (reference) transcripts: which file an instance is compared with.

An instance's golden name is `<case>.out`, or `<case>[<params>].out` when
the case has a matrix.  The transport is not part of the name: legacy,
uring and -file instances of a case share one file.  Variants are tried
first, in this order, and the first file that exists wins (as in
qemu-iotests' find_reference):

  1. `<name>.<transport>.out`  only for cases with `golden: per-transport`
  2. `<name>.no-uring.out`     when the kernel lacks FUSE-over-io_uring
  3. `<name>.out`
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from .context import Instance

# Lines a step prints only on targets that have them (the reference
# exporter's own log): a target without them is compared with the golden
# file minus these lines.
REFERENCE_ONLY = "reference-only: "


def without_reference_only(text: str) -> str:
    return "".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith(REFERENCE_ONLY))


def base_name(inst: Instance) -> str:
    key = inst.param_key
    return f"{inst.case_id}[{key}]" if key else inst.case_id


def candidates(
    golden_dir: Path, inst: Instance, per_transport: bool, uring_kernel: bool
) -> list[Path]:
    name = base_name(inst)
    tags = []
    if per_transport and inst.transport:
        tags.append(inst.transport)
    if not uring_kernel:
        tags.append("no-uring")
    return [golden_dir / f"{name}.{t}.out" for t in tags] + [golden_dir / f"{name}.out"]


def find_reference(
    golden_dir: Path, inst: Instance, per_transport: bool, uring_kernel: bool
) -> Path:
    """The first existing candidate; if none exists, the file --regen writes:
    the transport's own for per-transport cases, else the plain name."""
    paths = candidates(golden_dir, inst, per_transport, uring_kernel)
    for p in paths:
        if p.exists():
            return p
    return paths[-1] if not per_transport else paths[0]


@dataclass
class Comparison:
    ok: bool
    diff: str = ""
    bad: Path | None = None


def compare(
    golden: Path,
    actual: str,
    bad_dir: Path,
    bad_name: str,
    regen: bool,
    reference_only: bool = True,
) -> Comparison:
    """Compare with the golden file; write .out.bad and a diff, or regenerate.
    reference_only False: the target prints no REFERENCE_ONLY lines."""
    if regen:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual)
        return Comparison(True)
    try:
        expected = golden.read_text()
    except FileNotFoundError:
        expected = None
    if expected is not None and not reference_only:
        expected = without_reference_only(expected)
    if expected == actual:
        return Comparison(True)
    bad_dir.mkdir(parents=True, exist_ok=True)
    bad = bad_dir / f"{bad_name}.out.bad"
    bad.write_text(actual)
    if expected is None:
        return Comparison(False, f"no golden file {golden} (see {bad}; --regen)", bad)
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            str(golden),
            str(bad),
        )
    )
    return Comparison(False, diff, bad)
