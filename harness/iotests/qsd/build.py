"""QEMU built from source: qemu-storage-daemon, qemu-img and qemu-io from one
tree, with an ordered patch stack on top, cached under .cache/qemu/.

    Source        where the code comes from: a Debian source version (fetched
                  with a private apt state), a release tarball, or a QEMU tree
    PatchStack    the ordered patches (plain diffs, git format-patch or mbox)
    build()       apply, configure, ninja; a Build whose bin/ holds the tools

A build's cache key covers the source, the content of every patch applied
and the configure flags, so a second call with the same inputs returns at
once and a changed patch is a new build.  Compiles are shared between
builds through ccache, which makes the prefixes `tools/qsd bisect` needs
cheap.  Progress goes to stderr; errors are one BuildError line (with the
compiler's tail where a build failed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..lifecycle import REPO
from ..vm.apt import AptError, PrivateApt

CACHE = REPO / ".cache" / "qemu"
DEFAULT_SOURCE = "1:10.2.2+ds-1"
TOOLS = ("qemu-storage-daemon", "qemu-img", "qemu-io")
NINJA_TARGETS = {
    "qemu-storage-daemon": "storage-daemon/qemu-storage-daemon",
    "qemu-img": "qemu-img",
    "qemu-io": "qemu-io",
}
# The series' README: tools only, FUSE with lseek, io_uring; no firmware
# blobs (a +ds tarball has none) and no -Werror (new compilers, old trees).
CONFIGURE = (
    "--target-list=",
    "--without-default-features",
    "--without-default-devices",
    "--disable-docs",
    "--disable-install-blobs",
    "--disable-werror",
    "--enable-debug-info",
    "--enable-tools",
    "--enable-fuse",
    "--enable-fuse-lseek",
    "--enable-linux-io-uring",
)
# Debian 12 packages a build needs (dtc: configure wants it once blobs are gone).
BUILD_DEPS = (
    "gcc",
    "pkg-config",
    "ninja-build",
    "python3-venv",
    "libglib2.0-dev",
    "libfuse3-dev",
    "liburing-dev",
    "zlib1g-dev",
    "device-tree-compiler",
    "ccache",
)
# A +ds tarball strips python/wheels; configure's venv needs these offline.
WHEELS = ("meson==1.9.0", "pycotap>=1.1.0")
PATCH_SUFFIXES = (".patch", ".diff", ".mbox", ".eml")
CONFIGURE_BOUND = 600.0
NINJA_BOUND = 3600.0
FETCH_BOUND = 900.0


class BuildError(RuntimeError):
    """One line (and, for a failed compile, the compiler's tail) for the user."""


class BuildFailed(BuildError):
    """The inputs themselves do not build (a patch that does not apply, a
    compile error): remembered in the cache, so that bisect does not build
    the same broken prefix twice.  Fetch errors and timeouts are not."""


def say(msg: str) -> None:
    print(f"qsd: {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- the patch stack --------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    name: str  # the file name: what reports and bisect verdicts call it
    path: Path
    sha256: str


@dataclass(frozen=True)
class PatchStack:
    patches: tuple[Patch, ...]

    @classmethod
    def from_args(cls, args: Sequence[str]) -> PatchStack:
        """Files in the order given; a directory gives its patch files sorted
        by name (0001-..., as git format-patch numbers them)."""
        files: list[Path] = []
        for a in args:
            p = Path(a)
            if p.is_dir():
                found = sorted(f for f in p.iterdir() if f.suffix in PATCH_SUFFIXES)
                if not found:
                    raise BuildError(f"{a}: no patch files ({', '.join(PATCH_SUFFIXES)}) in it")
                files += found
            elif p.is_file():
                files.append(p)
            else:
                raise BuildError(f"{a}: no such patch file or directory")
        return cls(tuple(Patch(f.name, f.resolve(), _sha256(f)) for f in files))

    def upto(self, n: int | None) -> PatchStack:
        if n is None:
            return self
        if not 0 <= n <= len(self.patches):
            raise BuildError(f"--upto {n}: the stack has {len(self.patches)} patches")
        return PatchStack(self.patches[:n])

    @property
    def digest(self) -> str:
        """A short hash of the stack's content and order ('' when empty)."""
        if not self.patches:
            return ""
        return hashlib.sha256("".join(p.sha256 for p in self.patches).encode()).hexdigest()[:8]


# -- sources ----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where QEMU's code comes from.  kind: 'debian', 'tarball' or 'tree'."""

    kind: str
    spec: str  # the Debian version, or the path

    @classmethod
    def parse(cls, spec: str) -> Source:
        p = Path(spec)
        if p.is_dir():
            if not (p / "configure").is_file() or not (p / "block").is_dir():
                raise BuildError(f"{spec}: not a QEMU source tree (no configure, no block/)")
            return cls("tree", str(p.resolve()))
        if re.search(r"\.tar(\.(xz|bz2|gz|zst))?$", spec):
            if not p.is_file():
                raise BuildError(f"{spec}: no such tarball")
            return cls("tarball", str(p.resolve()))
        if re.fullmatch(r"([0-9]+:)?[0-9][A-Za-z0-9.+~]*(-[A-Za-z0-9.+~]+)?", spec):
            return cls("debian", spec)
        raise BuildError(
            f"--source {spec}: neither a QEMU tree, a .tar.* file nor a Debian version"
        )

    def identity(self) -> str:
        """What the cache key takes from the source."""
        if self.kind == "debian":
            return f"debian:{self.spec}"
        if self.kind == "tarball":
            return f"tarball:{_sha256(Path(self.spec))}"
        return f"tree:{self.spec}:{_tree_state(Path(self.spec))}"


def _tree_state(tree: Path) -> str:
    """HEAD and a hash of uncommitted changes; a tree that is not a git
    checkout is keyed by path alone (ninja then rebuilds what changed)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(tree), "diff", "HEAD"], capture_output=True, timeout=120
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "no-git"
    return f"{head or 'no-git'}+{hashlib.sha256(diff).hexdigest()[:12]}"


def _debian_tarball(version: str) -> Path:
    """The orig tarball of Debian's qemu source package, fetched once from
    sid's deb-src with a private apt state (the archive URI and keyring are
    the host's own)."""
    dest = CACHE / "debian" / version.replace(":", "_")
    done = dest / ".complete"
    if done.exists():
        return Path(done.read_text().strip())
    apt = PrivateApt(CACHE / "apt", ("sid",), types=("deb-src",))
    say(f"fetching Debian's qemu {version} source (private apt state, sid deb-src)")
    try:
        apt.update(max_age=24 * 3600.0)
        files = apt.source("qemu", version, dest / "files")
    except AptError as e:
        raise BuildError(f"cannot fetch Debian's qemu {version} source: {e}") from None
    origs = [f for f in files if ".orig.tar." in f.name]
    if not origs:
        raise BuildError(f"Debian's qemu {version}: no .orig tarball among {len(files)} files")
    done.write_text(str(origs[0]))
    return origs[0]


# -- building ---------------------------------------------------------------


@dataclass
class Build:
    """A finished build: what it was made of and where its tools are."""

    key: str
    version: str  # QEMU's VERSION file
    source: str  # Source.identity()
    patches: list[str]  # names, in order
    stack: str  # PatchStack.digest
    applied: list[str] = field(default_factory=list)  # fuzz/offset notes per patch
    configure: list[str] = field(default_factory=list)
    root: str = ""
    # What to give build() to make it again (repro scripts do).
    source_spec: str = ""
    patch_paths: list[str] = field(default_factory=list)

    @property
    def bin(self) -> Path:
        return Path(self.root) / "bin"

    @property
    def daemon(self) -> Path:
        return self.bin / "qemu-storage-daemon"

    @property
    def tree(self) -> Path:
        """The source tree built (qemu-iotests live in it)."""
        return Path(self.root) / "src"

    @property
    def build_dir(self) -> Path:
        return Path(self.root) / "build"

    @property
    def label(self) -> str:
        """'10.2.2+stack.1a2b3c4d': the version and the stack it carries."""
        return f"{self.version}+stack.{self.stack}" if self.stack else self.version


def info(binary: str | Path) -> Build | None:
    """The Build a binary printed by build() belongs to, or None."""
    meta = Path(binary).parent.parent / "build.json"
    if Path(binary).parent.name != "bin" or not meta.is_file():
        return None
    try:
        return Build(**json.loads(meta.read_text()))
    except (ValueError, TypeError):
        return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cache_key(source: Source, stack: PatchStack, configure: Sequence[str]) -> str:
    text = "\n".join([source.identity(), *(p.sha256 for p in stack.patches), *configure])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build(
    source_spec: str = DEFAULT_SOURCE,
    patches: Sequence[str] = (),
    upto: int | None = None,
    extra_configure: Sequence[str] = (),
) -> Build:
    """The cached build of source + patches[:upto]; built when missing."""
    source = Source.parse(source_spec)
    stack = PatchStack.from_args(patches).upto(upto)
    configure = (*CONFIGURE, *extra_configure)
    key = cache_key(source, stack, configure)
    root = CACHE / "builds" / key
    failed = CACHE / "builds" / f"{key}.failed"
    with _locked(CACHE / "builds" / f"{key}.lock"):
        found = info(root / "bin" / "qemu-storage-daemon")
        if found is not None and all((root / "bin" / t).exists() for t in TOOLS):
            return found
        if failed.exists():
            raise BuildFailed(f"(cached) {failed.read_text()}")
        try:
            return _build(source, stack, configure, key, root)
        except BuildFailed as e:
            failed.write_text(str(e))
            raise


def _build(
    source: Source, stack: PatchStack, configure: Sequence[str], key: str, root: Path
) -> Build:
    _install_deps()
    shutil.rmtree(root, ignore_errors=True)  # a partial build from an interrupted run
    root.mkdir(parents=True)
    started = time.monotonic()
    if source.kind == "tree" and not stack.patches:
        tree = Path(source.spec)  # a developer's checkout, built out of tree
        (root / "src").symlink_to(tree)
    else:
        tree = root / "src"
        _unpack(source, tree)
    applied = [_apply(p, tree, i, len(stack.patches)) for i, p in enumerate(stack.patches, 1)]
    _wheels(tree)
    build_dir = root / "build"
    build_dir.mkdir()
    env = _ccache_env()
    say(f"configure ({len(configure)} flags)")
    _run([str(tree / "configure"), *configure], build_dir, env, CONFIGURE_BOUND, "configure")
    targets = [NINJA_TARGETS[t] for t in TOOLS]
    say(f"ninja {' '.join(targets)}")
    _run(["ninja", f"-j{os.cpu_count() or 2}", *targets], build_dir, env, NINJA_BOUND, "ninja")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for t in TOOLS:
        (bin_dir / t).symlink_to(build_dir / NINJA_TARGETS[t])
    version = (tree / "VERSION").read_text().strip()
    result = Build(
        key=key,
        version=version,
        source=source.identity(),
        patches=[p.name for p in stack.patches],
        stack=stack.digest,
        applied=applied,
        configure=list(configure),
        root=str(root),
        source_spec=source.spec,
        patch_paths=[str(p.path) for p in stack.patches],
    )
    # Written last: a build without it is partial and is redone.
    (root / "build.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    say(f"built QEMU {result.label} in {time.monotonic() - started:.0f} s")
    return result


def _install_deps() -> None:
    missing = [p for p in BUILD_DEPS if not _installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildError(f"build dependencies missing (need root to install): {' '.join(missing)}")
    say(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    for argv in (
        ["apt-get", *lock, "-qq", "update"],
        ["apt-get", *lock, "-y", "-qq", "install", *missing],
    ):
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=FETCH_BOUND)
        if res.returncode:
            tail = (res.stderr.strip().splitlines() or ["?"])[-1]
            raise BuildError(f"{' '.join(argv[:1] + argv[3:5])} failed: {tail}")


def _installed(package: str) -> bool:
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return res.stdout.endswith("installed") and "not-installed" not in res.stdout


def _unpack(source: Source, tree: Path) -> None:
    if source.kind == "tree":  # patches on a checkout: build a copy, never touch it
        say(f"copying {source.spec} (tracked files and uncommitted changes)")
        tree.mkdir()
        files = subprocess.run(
            ["git", "-C", source.spec, "ls-files", "-z", "--recurse-submodules"],
            capture_output=True,
            timeout=120,
        )
        if files.returncode:
            raise BuildError(f"{source.spec}: patches on a tree need a git checkout")
        for name in files.stdout.decode().split("\0"):
            if name and (Path(source.spec) / name).is_file():
                dst = tree / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(source.spec) / name, dst, follow_symlinks=False)
        return
    tarball = Path(source.spec) if source.kind == "tarball" else _debian_tarball(source.spec)
    say(f"unpacking {tarball.name}")
    tmp = tree.parent / "unpack"
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="tar")
    tops = list(tmp.iterdir())
    if len(tops) != 1 or not (tops[0] / "configure").is_file():
        raise BuildError(f"{tarball.name}: not a QEMU release tarball (one top directory)")
    tops[0].rename(tree)
    tmp.rmdir()


_HUNK_FAILED = re.compile(r"Hunk #(\d+) FAILED at (\d+)")
_FILE = re.compile(r"^(?:patching|checking) file '?([^'\n]+)'?$")


def _apply(patch: Patch, tree: Path, n: int, total: int) -> str:
    """Apply with fuzz allowed; a note of what needed fuzz or an offset."""
    argv = ["patch", "-p1", "-N", "-F2", "--no-backup-if-mismatch", "-r", "-",
            "-i", str(patch.path)]  # fmt: skip
    # A dry run first, so a stack that does not apply leaves no half-patched file.
    dry = subprocess.run([*argv, "--dry-run"], cwd=tree, capture_output=True, text=True, timeout=60)
    if dry.returncode:
        raise BuildFailed(f"patch {n}/{total} {patch.name} does not apply: {_failure(dry.stdout)}")
    res = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=60)
    if res.returncode:
        raise BuildFailed(f"patch {n}/{total} {patch.name} does not apply: {_failure(res.stdout)}")
    notes, current = [], ""
    for line in res.stdout.splitlines():
        m = _FILE.match(line)
        if m:
            current = m.group(1)
        elif line.startswith("Hunk #") and ("fuzz" in line or "offset" in line):
            notes.append(f"{current}: {line.rstrip('.')}")
    note = "; ".join(notes) if notes else "clean"
    say(f"applied {n}/{total} {patch.name}: {note}")
    return f"{patch.name}: {note}"


def _failure(out: str) -> str:
    current = ""
    for line in out.splitlines():
        m = _FILE.match(line)
        if m:
            current = m.group(1)
        h = _HUNK_FAILED.search(line)
        if h:
            return f"{current}: hunk #{h.group(1)} FAILED at line {h.group(2)}"
        if "can't find file" in line or "No file to patch" in line or "malformed" in line:
            return line.strip()
    return (out.strip().splitlines() or ["patch failed"])[-1]


def _wheels(tree: Path) -> None:
    """A +ds tarball has no python/wheels: configure's offline venv then needs
    meson and pycotap, downloaded once from PyPI into the cache."""
    wheels = tree / "python" / "wheels"
    if wheels.is_dir() and any(wheels.glob("meson-*.whl")):
        return
    store = CACHE / "wheels"
    if not any(store.glob("meson-*.whl")) or not any(store.glob("pycotap-*.whl")):
        say(f"pip download {' '.join(WHEELS)}")
        store.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
             "--no-deps", "--only-binary", ":all:", "-d", str(store), *WHEELS],
            capture_output=True, text=True, timeout=FETCH_BOUND,
        )  # fmt: skip
        if res.returncode:
            tail = (res.stderr.strip().splitlines() or ["?"])[-1]
            raise BuildError(f"pip download {' '.join(WHEELS)} failed: {tail}")
    wheels.mkdir(parents=True, exist_ok=True)
    for whl in store.glob("*.whl"):
        shutil.copy2(whl, wheels / whl.name)


def _ccache_env() -> dict[str, str]:
    """Compiles shared between builds (prefixes of a stack differ in a few
    files): meson uses ccache when it is installed; one store under the
    cache, paths taken relative to each build."""
    env = {**os.environ, "CCACHE_DIR": str(CACHE / "ccache"), "CCACHE_BASEDIR": str(CACHE),
           "CCACHE_NOHASHDIR": "true", "CCACHE_MAXSIZE": "5G"}  # fmt: skip
    if shutil.which("ccache") and "CC" not in env:
        env["CC"] = "ccache cc"  # configure puts it in meson's cross file as it is
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str], bound: float, what: str) -> None:
    log = cwd / f"{what}.log"
    with log.open("w") as out:
        try:
            res = subprocess.run(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=bound
            )
        except subprocess.TimeoutExpired:
            raise BuildError(f"{what} did not finish within {bound:.0f} s (log: {log})") from None
    if res.returncode:
        raise BuildFailed(f"{what} failed (exit {res.returncode}, log: {log}):\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    """The compiler's error: from ninja's first FAILED line, else the end."""
    text = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(text):
        if line.startswith("FAILED:"):
            return "\n".join(text[i : i + lines])
    return "\n".join(text[-lines:])
