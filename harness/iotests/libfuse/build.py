"""Build liburing and libfuse (with io_uring) into .cache/libfuse, and our
block export server against them.

    python -m harness.iotests.libfuse.build [--source DIR]

Debian's binary fuse3 is built without io_uring (its build-deps lack
liburing), so both come from source packages, fetched with a private apt
state (vm/apt.py).  meson leaves io_uring out silently when liburing or
libnuma is missing: HAVE_URING in fuse_config.h is the check.  The result
is cached; --source DIR builds a libfuse checkout instead, incrementally,
into a prefix of its own.  The prefix is printed last.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ...cli import OneLineParser
from ..lifecycle import REPO
from ..vm.apt import AptError, PrivateApt

CACHE = REPO / ".cache" / "libfuse"
SERVER = Path(__file__).with_name("blkexport.c")
SERVER_NAME = "fuse-iotests-blk"
# Source packages (name, version): the only libfuse with the io_uring
# transport Debian has, and the liburing it needs; pinned, as the archive
# serves no other versions of them.
PACKAGES = {"liburing": ("liburing", "2.15-1"), "libfuse": ("fuse3", "3.18.3-1")}
SUITES = ("sid",)
LISTS_MAX_AGE = 24 * 3600.0
BUILD_BOUND = 900.0  # one configure or compile step
HOST_TOOLS = {"meson": "meson", "ninja": "ninja-build", "pkg-config": "pkg-config", "gcc": "gcc"}
HOST_LIBS = {"/usr/include/numa.h": "libnuma-dev"}


class BuildError(RuntimeError):
    """The build cannot be done; str() is one line."""


def server_path(prefix: Path) -> Path:
    return prefix / "bin" / SERVER_NAME


def default_prefix() -> Path:
    return CACHE / "prefix"


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    try:
        res = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_BOUND
        )
    except subprocess.TimeoutExpired:
        raise BuildError(f"{argv[0]} did not finish within {BUILD_BOUND:.0f} s") from None
    if res.returncode:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise BuildError(f"{' '.join(argv[:3])} failed (status {res.returncode}):\n{tail}")


def _host_packages() -> None:
    """The build tools and headers, from the host's own suite."""
    need = [p for t, p in HOST_TOOLS.items() if shutil.which(t) is None]
    need += [p for f, p in HOST_LIBS.items() if not Path(f).exists()]
    if not need:
        return
    print(f"libfuse: apt-get install {' '.join(need)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "install", "-y", "-qq", *need], Path("/"), env)


def _fetch(apt: PrivateApt, package: tuple[str, str], dest: Path) -> Path:
    """The unpacked source tree of a source package (fetched once)."""
    name, version = package
    tree = dest / f"{name}-{version.split('-')[0]}"
    if not tree.is_dir():
        files = apt.source(name, version, dest / "dl")
        dsc = [f for f in files if f.name == f"{name}_{version}.dsc"]
        if len(dsc) != 1:
            raise BuildError(f"source package {name}={version}: no .dsc among {files}")
        # apt checked the files against the signed Sources index already.
        _run(["dpkg-source", "--no-check", "-x", str(dsc[0]), str(tree)], dest)
    return tree


def _pkg_env(prefix: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PKG_CONFIG_PATH": str(prefix / "lib" / "pkgconfig"),
        "LDFLAGS": f"-Wl,-rpath,{prefix / 'lib'}",
    }


def _liburing(src: Path, prefix: Path) -> None:
    if (prefix / "lib" / "pkgconfig" / "liburing.pc").exists():
        return
    p = str(prefix)
    _run(
        ["./configure", f"--prefix={p}", f"--libdir={p}/lib", f"--libdevdir={p}/lib",
         f"--includedir={p}/include", f"--mandir={p}/share/man"],
        src,
    )  # fmt: skip
    _run(["make", "-j2", "-C", "src"], src)
    _run(["make", "install"], src)


def _libfuse(src: Path, build: Path, prefix: Path) -> None:
    env = _pkg_env(prefix)
    if not (build / "build.ninja").exists():
        _run(
            ["meson", "setup", str(build), str(src), f"--prefix={prefix}", "--libdir=lib",
             "-Denable-io-uring=true", "-Dexamples=false", "-Dtests=false", "-Dutils=false",
             "-Duseroot=false", "-Dinitscriptdir=", f"-Dc_link_args=-Wl,-rpath,{prefix}/lib"],
            src, env,
        )  # fmt: skip
    _run(["ninja", "-C", str(build), "install"], src, env)
    config = build / "fuse_config.h"
    text = config.read_text() if config.exists() else ""
    if "#define HAVE_URING" not in text:
        raise BuildError(
            f"{config}: no HAVE_URING; meson left io_uring out (liburing or libnuma missing?)"
        )


def _server(prefix: Path) -> None:
    env = _pkg_env(prefix)
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    out = server_path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(
        ["gcc", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SERVER),
         *flags, "-lpthread", f"-Wl,-rpath,{prefix}/lib"],
        REPO,
    )  # fmt: skip


def _stamp(source: Path | None) -> str:
    """What a cached prefix was built from: the packages and our server."""
    what = f"{PACKAGES} {SUITES} {source}\n".encode() + SERVER.read_bytes()
    return hashlib.sha256(what).hexdigest()


def build(source: Path | None = None) -> Path:
    """The prefix with liburing, libfuse and our server; built if need be."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time
        if source is None:
            prefix = default_prefix()
        else:
            tag = hashlib.sha256(str(source).encode()).hexdigest()[:12]
            prefix = CACHE / f"source-{tag}" / "prefix"
        stamp = prefix / ".complete"
        want = _stamp(source)
        if source is None and stamp.exists() and stamp.read_text() == want:
            return prefix
        _host_packages()
        apt = PrivateApt(CACHE / "apt", SUITES, types=("deb-src",))
        try:
            apt.update(max_age=LISTS_MAX_AGE)
            uring = _fetch(apt, PACKAGES["liburing"], CACHE / "src")
            fuse = source or _fetch(apt, PACKAGES["libfuse"], CACHE / "src")
        except AptError as e:
            raise BuildError(str(e)) from None
        stamp.unlink(missing_ok=True)
        _liburing(uring, prefix)
        _libfuse(fuse, prefix.parent / "build-libfuse", prefix)
        _server(prefix)
        stamp.write_text(want)
        return prefix


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="libfuse build", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, help="a libfuse checkout to build instead")
    args = p.parse_args(argv)
    source = args.source.resolve() if args.source else None
    if source is not None and not (source / "meson.build").is_file():
        print(f"libfuse build: {args.source}: not a libfuse tree (no meson.build)", file=sys.stderr)
        return 1
    try:
        prefix = build(source)
    except BuildError as e:
        print(f"libfuse build: {e}", file=sys.stderr)
        return 1
    print(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
