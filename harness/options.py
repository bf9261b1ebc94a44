"""Export options: one table, from which every view of them derives.

The reference exporter's command line, the harness's exporter arguments, a
case's `export:` block and `start-export` step, which options the qsd target
has, and the option table in docs/targets.md are all read from OPTIONS, so
a new option is one row here, plus its use in the exporter and, where QSD has it,
its QMP argument in targets/qsd.py.  Defaults are QEMU's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# The reference exporter's mount type: how the harness tells its mounts apart.
FSTYPE = "fuse.fuse-iotests"

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a size the way qemu-img does: 4096, 64k, 1M, 2G (binary units)."""
    s = text.strip().lower()
    num = s.rstrip("bkmgt")
    suffix = s[len(num) :]
    if suffix not in _SUFFIXES or not num.isdigit():
        raise ValueError(f"Invalid size '{text}'")
    return int(num) * _SUFFIXES[suffix]


# -- converters: YAML values and command-line strings alike ------------------


def boolean(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if v in ("on", "off", "true", "false"):
        return v in ("on", "true")
    raise ValueError(f"{v!r} is not true/false/on/off")


def positive(v: Any) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{v!r} is not a positive integer")
    return v


def size_bytes(v: Any) -> int:
    """A positive size: 4096, '128k'."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a size")
    n = v if isinstance(v, int) else parse_size(str(v))
    if n <= 0:
        raise ValueError(f"Invalid size '{v}'")
    return n


def choice(*names: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in names:
            raise ValueError(f"{v!r} is not one of {', '.join(names)}")
        return str(v)

    conv.choices = names  # type: ignore[attr-defined]
    return conv


@dataclass(frozen=True)
class ExportOption:
    key: str  # YAML key, exporter flag (--key) and QMP-style name
    convert: Callable[[Any], Any]
    default: Any
    doc: str
    qsd: str  # how qemu-storage-daemon takes it; "" = it has no such option
    step: bool = True  # a start-export step may set it (not only a case's export:)
    metavar: str = "VALUE"

    @property
    def flag(self) -> str:
        return f"--{self.key}"

    @property
    def switch(self) -> bool:
        """A boolean that is off by default: a bare --flag turns it on."""
        return self.default is False


OPTIONS: tuple[ExportOption, ...] = (
    ExportOption("writable", boolean, False, "accept writes", "block-export-add writable"),
    ExportOption(
        "growable", boolean, False, "a write past EOF grows the image", "block-export-add growable"
    ),
    ExportOption(
        "allow-other",
        choice("on", "off", "auto"),
        "auto",
        "mount with allow_other (auto: try it, fall back)",
        "block-export-add allow-other",
    ),
    ExportOption(
        "queues",
        positive,
        1,
        "queue threads, each on its own /dev/fuse clone",
        "N > 1: object-add N iothreads, block-export-add iothread [list] (QEMU 10.1+)",
        metavar="N",
    ),
    ExportOption(
        "io-uring",
        choice("on", "off", "auto"),
        "off",
        "FUSE-over-io_uring (auto: fall back to /dev/fuse)",
        "on: block-export-add io-uring true, where the schema has it",
    ),
    ExportOption("ring-depth", positive, 64, "ring entries per ring queue", "", metavar="N"),
    ExportOption(
        "share-ring-queues",
        boolean,
        False,
        "every queue thread has entries on every ring queue (ring-depth split"
        " among them): home threads serve one client, queue 0 serves several",
        "",
    ),
    ExportOption(
        "queue-processes",
        boolean,
        False,
        "io_uring: each queue in a process of its own, no GIL between them"
        " (data requests served there, the rest forwarded)",
        "",
    ),
    ExportOption(
        "max-write",
        size_bytes,
        128 << 10,
        "max_write offered in FUSE_INIT (multiple of 4 KiB, at most 1 MiB)",
        "",
        metavar="SIZE",
    ),
    ExportOption(
        "null-size",
        size_bytes,
        None,
        "export null-co of this size instead of an image",
        "blockdev-add null-co size, read-zeroes",
        step=False,
        metavar="SIZE",
    ),
)
BY_KEY: dict[str, ExportOption] = {o.key: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings(Mapping[str, Any]):
    """One export's options, converted, with the keys that were set explicitly:
    a target without an option can still serve a case that leaves it alone."""

    values: Mapping[str, Any] = field(default_factory=lambda: {o.key: o.default for o in OPTIONS})
    explicit: frozenset[str] = frozenset()

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def with_(self, changes: Mapping[str, Any], explicit: bool = True) -> Settings:
        """These (raw) values converted and applied; raise ValueError naming the
        key.  explicit=False: implied values (a default, the transport), which
        a target without the option can still serve."""
        values = dict(self.values)
        for key, raw in changes.items():
            opt = BY_KEY.get(key)
            if opt is None:
                raise ValueError(f"unknown export option '{key}'")
            try:
                values[key] = opt.convert(raw)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{key}: {e}") from None
        return Settings(values, self.explicit | frozenset(changes if explicit else ()))

    def argv(self) -> list[str]:
        """The reference exporter's flags for every value that is not its default."""
        out: list[str] = []
        for o in OPTIONS:
            v = self.values[o.key]
            if v == o.default:
                continue
            out += [o.flag] if o.switch else [o.flag, str(v)]
        return out


def reference_table() -> str:
    """The options as Markdown rows, for docs/targets.md (kept in sync by a test)."""
    rows = []
    for o in OPTIONS:
        default = "none" if o.default is None else str(o.default).lower()
        qsd = o.qsd or "no (instances that set it are not run on QSD)"
        where = "" if o.step else " (case `export:` only)"
        rows.append(f"| `{o.key}` | `{default}` | {o.doc}{where} | {qsd} |")
    return "\n".join(rows)
