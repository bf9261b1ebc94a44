"""Kernels to boot: Debian packages fetched into a cache, or the user's own build.

    6.1, 6.12, 6.16, 7.3     the newest Debian package of that series
    6.1.176-1, 7.3.4         a package version (Debian's, or upstream's)
    ~/linux                  a kernel tree with a built arch/x86/boot/bzImage
    bzImage:MODULES_DIR      a kernel image and its modules (lib/modules/<release>)

Debian kernels come from bookworm (6.1), trixie (6.12) and trixie-backports
(6.16 and newer), fetched with a private apt state (vm/apt.py) into
.cache/vm/kernels/<version>/ and extracted there once: the generic -amd64
flavour only, as the cloud one has no 9p.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..lifecycle import REPO
from .apt import AptError, PrivateApt

CACHE = REPO / ".cache" / "vm"
SUITES = ("bookworm", "bookworm-updates", "trixie", "trixie-updates", "trixie-backports")
# Package names: linux-image-6.1.0-50-amd64[-unsigned], linux-image-6.16.12+deb13-amd64,
# and from 7.2 on linux-binary-unsigned-<release> with linux-modules-<release>.
_IMAGE = re.compile(
    r"linux-image-(?P<release>[0-9][0-9.]*(?:-[0-9]+|\+deb[0-9]+)-amd64)(-unsigned)?"
)


SERIES = r"[0-9]+\.[0-9]+"  # 6.1: the newest package of the series
# A series is looked up again in package lists at most this old: a new stable
# update shows up within a day, and a run does not touch the network each time.
LISTS_MAX_AGE = 24 * 3600.0


class KernelError(RuntimeError):
    """A kernel that cannot be had; str() is one line."""


@dataclass(frozen=True)
class Kernel:
    """Something virtme-ng can boot with -r."""

    name: str  # what the user and the results call it: 6.1.176-1, or the path
    boot: Path  # the kernel image, or a kernel tree
    release: str = ""  # uname -r, when known before booting

    @property
    def label(self) -> str:
        """A short, path-safe name for results directories."""
        return re.sub(
            r"[^A-Za-z0-9.+-]", "_", Path(self.name).name if "/" in self.name else self.name
        )


def _apt() -> PrivateApt:
    return PrivateApt(CACHE / "apt", SUITES)


def _upstream(version: str) -> str:
    """6.1.176-1 -> 6.1.176; 7.3.4-1~bpo13+1 -> 7.3.4."""
    return version.split("-", 1)[0]


def _matches(want: str, version: str) -> bool:
    if want == version or want == _upstream(version):
        return True
    series = ".".join(_upstream(version).split(".")[:2])
    return want == series


def _version_key(version: str) -> list[int]:
    return [int(x) for x in re.findall(r"[0-9]+", version)]


def resolve(spec: str) -> Kernel:
    """The kernel a --kernel argument names, fetched if need be."""
    path = Path(spec.split(":", 1)[0]).expanduser()
    if "/" in spec or path.exists():
        return _local(spec)
    if not re.fullmatch(r"[0-9]+\.[0-9]+[0-9A-Za-z.+~-]*", spec):
        raise KernelError(f"--kernel {spec!r}: not a kernel version (6.1, 7.3.4) or a path")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "kernels.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch at a time
        if not re.fullmatch(SERIES, spec):  # an exact version fetched before: no network
            for done in sorted((CACHE / "kernels").glob("*/.complete")):
                if _matches(spec, done.parent.name):
                    return _cached(done.parent)
        return _fetch(spec)


def _fetch(spec: str) -> Kernel:
    apt = _apt()
    try:
        apt.update(max_age=LISTS_MAX_AGE)
        images = apt.packages(r"linux-image-[0-9].*-amd64(-unsigned)?")
    except AptError as e:
        raise KernelError(f"--kernel {spec}: {e}") from None
    candidates = {
        name: version
        for name, version in images.items()
        if _IMAGE.fullmatch(name) and _matches(spec, version)
    }
    if not candidates:
        raise KernelError(f"--kernel {spec}: no Debian -amd64 kernel package of that version")
    version = max(candidates.values(), key=_version_key)
    release = next(
        _IMAGE.fullmatch(n).group("release") for n, v in candidates.items() if v == version
    )  # type: ignore[union-attr]
    dest = CACHE / "kernels" / version
    if (dest / ".complete").exists():
        return _cached(dest)
    names = _package_set(apt, release, candidates)
    tmp = Path(
        tempfile.mkdtemp(
            prefix=f"{version}.tmp.",
            dir=dest.parent if dest.parent.exists() else _mkdir(dest.parent),
        )
    )
    try:
        debs = apt.download(names, tmp / "debs")
        root = tmp / "root"
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        shutil.rmtree(tmp / "debs")
        (tmp / ".complete").write_text(f"{release}\n{' '.join(names)}\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except (AptError, subprocess.CalledProcessError) as e:
        raise KernelError(f"--kernel {spec}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _cached(dest)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _package_set(apt: PrivateApt, release: str, candidates: dict[str, str]) -> list[str]:
    """The packages that hold the image and the modules of one release."""
    if f"linux-image-{release}-unsigned" in candidates:
        return [f"linux-image-{release}-unsigned"]
    split = apt.packages(rf"linux-(binary-unsigned|modules)-{re.escape(release)}")
    if len(split) == 2:  # 7.2 on: the image and the modules in two packages
        return sorted(split)
    return [f"linux-image-{release}"]


def _cached(dest: Path) -> Kernel:
    release = (dest / ".complete").read_text().split()[0]
    root = dest / "root"
    _layout(root, release)
    image = root / "boot" / f"vmlinuz-{release}"
    if not image.exists():
        raise KernelError(f"{dest}: no kernel image for {release} in the fetched packages")
    return Kernel(dest.name, image, release)


def _layout(root: Path, release: str) -> None:
    """boot/vmlinuz-R and lib/modules/R, where virtme-ng looks for them:
    merged-/usr packages put modules in usr/lib, and from 7.2 the image
    too (usr/lib/modules/R/vmlinuz.unsigned)."""
    usr_modules = root / "usr/lib/modules" / release
    if not (root / "lib").exists() and usr_modules.is_dir():
        (root / "lib").symlink_to("usr/lib")
    image = root / "boot" / f"vmlinuz-{release}"
    packaged = usr_modules / "vmlinuz.unsigned"
    if not image.exists() and packaged.exists():
        image.parent.mkdir(exist_ok=True)
        image.symlink_to(f"../{packaged.relative_to(root)}")


def _local(spec: str) -> Kernel:
    """The user's own build: a tree, or IMAGE:MODULES_DIR laid out as virtme-ng wants it."""
    image_s, _, modules_s = spec.partition(":")
    image = Path(image_s).expanduser().resolve()
    if image.is_dir():
        if not (image / "arch/x86/boot/bzImage").exists():
            raise KernelError(
                f"--kernel {spec}: a kernel tree without arch/x86/boot/bzImage (build it)"
            )
        return Kernel(str(image), image)
    if not image.is_file():
        raise KernelError(f"--kernel {spec}: no such kernel image or tree")
    if not modules_s:
        return Kernel(str(image), image)
    modules = Path(modules_s).expanduser().resolve()
    release = modules.name
    if not modules.is_dir() or not any(modules.glob("modules.*")):
        raise KernelError(f"--kernel {spec}: {modules} is not a lib/modules/<release> directory")
    # virtme-ng finds modules beside the image: <root>/boot/vmlinuz-R and <root>/lib/modules/R.
    root = CACHE / "local" / re.sub(r"[^A-Za-z0-9.+-]", "_", f"{image}-{release}")
    (root / "boot").mkdir(parents=True, exist_ok=True)
    (root / "lib" / "modules").mkdir(parents=True, exist_ok=True)
    for link, to in (
        (root / "boot" / f"vmlinuz-{release}", image),
        (root / "lib/modules" / release, modules),
    ):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(to)
    return Kernel(str(image), root / "boot" / f"vmlinuz-{release}", release)
