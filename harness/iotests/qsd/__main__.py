"""tools/qsd: qemu-storage-daemon builds for the qsd targets.

    tools/qsd fetch                  upstream QSD 11.1 from Debian, once; prints the wrapper
    tools/qsd path | version         the fetched wrapper, or its --version line
    tools/qsd build [--source S] [--patches P...] [--upto N]
                                     QEMU from source with a patch stack; prints the daemon
    tools/qsd bisect INSTANCE [--patches P...] [check args]
                                     the first patch after which INSTANCE fails as it does now
    tools/qsd iotests [TEST...] [--patches P...]
                                     QEMU's own qemu-iotests -fuse in the built tree

Progress goes to stderr; the path asked for is the last line of stdout.
"""

from __future__ import annotations

import argparse

from ...cli import OneLineParser, run_tool
from .build import DEFAULT_SOURCE, BuildError, build, say
from .series import default_patches


def _build_args(p: argparse.ArgumentParser, series_default: bool) -> None:
    p.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help=f"a Debian source version of qemu (default {DEFAULT_SOURCE}), a release "
        "tarball (.tar.*), or a QEMU source tree (built out of tree)",
    )
    p.add_argument(
        "--patches",
        nargs="+",
        metavar="DIR|FILE",
        default=None,
        help="an ordered patch stack: files in order, or a directory of *.patch files "
        + ("(default: FUSE_IOTESTS_SERIES or ../shared/qemu-series)" if series_default else ""),
    )


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="qsd", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("fetch", help="fetch upstream QSD 11.1 once; print the wrapper")
    sub.add_parser("path", help="the fetched 11.1 wrapper, or exit 1")
    sub.add_parser("version", help="the fetched 11.1 daemon's --version line")
    b = sub.add_parser("build", help="build QEMU from source with a patch stack")
    _build_args(b, series_default=False)
    b.add_argument("--upto", type=int, metavar="N", help="apply only the first N patches")
    bis = sub.add_parser("bisect", help="name the patch that made an instance fail as it does")
    bis.add_argument("instance", help="an instance id, e.g. 'eof-dd[qsd-uring-growable=off]'")
    _build_args(bis, series_default=True)
    bis.add_argument(
        "--repro", metavar="FILE", help="also write a repro script for the first bad build"
    )
    io = sub.add_parser("iotests", help="QEMU's qemu-iotests -fuse in the built tree")
    io.add_argument("tests", nargs="*", help="test names (default: the FUSE ones)")
    _build_args(io, series_default=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command in ("fetch", "path", "version"):
            from . import fetch

            if args.command == "fetch":
                print(fetch.fetch())
            elif args.command == "path":
                print(fetch.fetched())
            else:
                print(fetch.version())
            return 0
        if args.command == "build":
            result = build(args.source, args.patches or (), args.upto)
            for note in result.applied:
                say(f"patch {note}")
            print(result.daemon)
            return 0
        patches = args.patches if args.patches is not None else default_patches()
        if args.command == "bisect":
            from .bisect import bisect

            return bisect(args.instance, args.source, patches, args.repro)
        from .iotests import run_iotests

        return run_iotests(args.tests, args.source, patches)
    except BuildError as e:
        say(str(e))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    run_tool(main)
