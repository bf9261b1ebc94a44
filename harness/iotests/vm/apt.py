"""Debian packages from other suites, with a private apt state.

The host's apt configuration is never changed: a sources list, lists,
cache and preferences of our own live under a cache directory, and the
archive URI (and its keyring) is taken from the host's own apt sources,
so no registry host name is written anywhere in the repository.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SOURCES = Path("/etc/apt/sources.list")
SOURCE_PARTS = Path("/etc/apt/sources.list.d")
SUITE = re.compile(
    r"^(buster|bullseye|bookworm|trixie|forky|sid|oldstable|stable|testing|unstable)"
    r"(-updates|-backports)?$"
)


APT_BOUND = 900.0  # an update or a kernel download (~100 MB)


class AptError(RuntimeError):
    pass


def _deb822(text: str) -> list[dict[str, str]]:
    stanzas, cur, last = [], {}, ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur, last = {}, ""
        elif line[0] in " \t":
            if last:  # a continuation (an inline key block)
                cur[last] += "\n" + line.strip()
        elif ":" in line:
            key, val = line.split(":", 1)
            last = key.strip().lower()
            cur[last] = val.strip()
    return stanzas


_ONE_LINE = re.compile(
    r"^deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)\s+(?P<comps>.+)$"
)


def _one_line(text: str) -> list[dict[str, str]]:
    """`deb [opt=val ...] URI suite component...` lines."""
    out = []
    for line in text.splitlines():
        m = _ONE_LINE.match(line.split("#", 1)[0].strip())
        if m is None:
            continue
        opts = dict(o.split("=", 1) for o in (m.group("opts") or "").split() if "=" in o)
        out.append(
            {
                "types": "deb",
                "uris": m.group("uri"),
                "suites": m.group("suite"),
                "components": m.group("comps"),
                "signed-by": opts.get("signed-by", ""),
            }
        )
    return out


def mirror() -> tuple[str, str]:
    """(archive URI, keyring or '') of the host's first Debian main source
    that is not the security archive."""
    entries: list[dict[str, str]] = []
    if SOURCES.is_file():
        entries += _one_line(SOURCES.read_text())
    for f in sorted(SOURCE_PARTS.glob("*.list")) if SOURCE_PARTS.is_dir() else []:
        entries += _one_line(f.read_text())
    for f in sorted(SOURCE_PARTS.glob("*.sources")) if SOURCE_PARTS.is_dir() else []:
        entries += _deb822(f.read_text())
    for e in entries:
        if e.get("enabled", "yes").lower() == "no" or "deb" not in e.get("types", "").split():
            continue
        if "main" not in e.get("components", "").split():
            continue
        for uri in e.get("uris", "").split():
            suites = e.get("suites", "").split()
            if "security" not in uri and any(SUITE.match(s) for s in suites):
                key = e.get("signed-by", "")
                return uri, key if key.startswith("/") and "\n" not in key else ""
    raise AptError("no Debian archive URI in the host's apt sources")


@dataclass
class PrivateApt:
    """apt-get and apt-cache on suites of our choosing, state under root."""

    root: Path
    suites: tuple[str, ...]
    types: tuple[str, ...] = ("deb",)  # ("deb-src",) for source packages

    def _options(self) -> list[str]:
        a = self.root
        return [
            "-o", f"Dir::Etc::sourcelist={a / 'sources.list'}", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={a / 'lists'}", "-o", f"Dir::Cache={a / 'cache'}",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Architecture=amd64",
            "-o", "APT::Architectures::=amd64", "-o", "Debug::NoLocking=1",
            "-o", "Acquire::Languages=none",
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        return {**os.environ, "APT_CONFIG": str(self.root / "apt.conf")}

    def update(self, max_age: float = 0.0) -> None:
        """Configure the private state and fetch the package lists, unless
        lists from the same sources are younger than max_age seconds."""
        uri, key = mirror()
        a = self.root
        for d in ("lists/partial", "cache", "parts", "prefs", "debs"):
            (a / d).mkdir(parents=True, exist_ok=True)
        os.chmod(a, 0o755)  # apt fetches as _apt
        try:
            apt_uid = pwd.getpwnam("_apt").pw_uid
            if os.geteuid() == 0:
                for d in ("lists/partial", "debs"):
                    os.chown(a / d, apt_uid, -1)
        except KeyError:
            pass
        signed = f"[signed-by={key}] " if key and os.access(key, os.R_OK) else ""
        sources = "".join(f"{t} {signed}{uri} {s} main\n" for t in self.types for s in self.suites)
        stamp = a / "lists" / ".updated"
        fresh = stamp.exists() and time.time() - stamp.stat().st_mtime < max_age
        if fresh and stamp.read_text() == sources:
            return
        (a / "sources.list").write_text(sources)
        # Only the host's proxy and validity settings carry over; its
        # apt.conf.d hooks stay off this private state.
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True).stdout
        keep = [
            ln
            for ln in dump.splitlines()
            if re.match(r"^Acquire::((https?|ftp)::Proxy|Check-Valid-Until|Check-Date)", ln)
        ]
        (a / "apt.conf").write_text(
            "\n".join(
                [
                    f'Dir::Etc::parts "{a / "parts"}";',
                    'Dir::Etc::main "/dev/null";',
                    f'Dir::Etc::preferencesparts "{a / "prefs"}";',
                    'Dir::Etc::preferences "/dev/null";',
                    *keep,
                ]
            )
            + "\n"
        )
        self._run(["apt-get", *self._options(), "-qq", "update"])
        stamp.write_text(sources)

    def _run(self, argv: list[str], cwd: Path | None = None) -> str:
        try:
            res = subprocess.run(
                argv, capture_output=True, text=True, env=self._env(), cwd=cwd, timeout=APT_BOUND
            )
        except subprocess.TimeoutExpired:
            raise AptError(f"{argv[0]} did not finish within {APT_BOUND:.0f} s") from None
        if res.returncode:
            last = (res.stderr.strip().splitlines() or ["?"])[-1]
            raise AptError(f"{argv[0]} {' '.join(a for a in argv[1:] if not a.startswith('-'))}"
                           f" failed: {last}")  # fmt: skip
        return res.stdout

    def packages(self, pattern: str) -> dict[str, str]:
        """Package name -> candidate version, for names matching a regex."""
        names = self._run(["apt-cache", *self._options(), "pkgnames"]).split()
        found = sorted(n for n in names if re.fullmatch(pattern, n))
        if not found:
            return {}
        out = self._run(["apt-cache", *self._options(), "policy", *found])
        versions, name = {}, ""
        for line in out.splitlines():
            if line and not line[0].isspace() and line.endswith(":"):
                name = line[:-1]
            elif line.strip().startswith("Candidate:") and name:
                versions[name] = line.split()[1]
        return {n: v for n, v in versions.items() if v != "(none)"}

    def depends(self, name: str) -> list[str]:
        """The Depends closure of a package as apt resolves it (real package
        names only: no <virtual> ones), sorted."""
        out = self._run(
            ["apt-cache", *self._options(), "depends", "--recurse", "--no-recommends",
             "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces",
             "--no-enhances", name]
        )  # fmt: skip
        return sorted({ln for ln in out.splitlines() if ln and ln[0] not in " <"})

    def source(self, name: str, version: str, dest: Path) -> list[Path]:
        """The files of source package name=version (.dsc, tarballs), checked
        against the signed Sources index, into dest."""
        dest.mkdir(parents=True, exist_ok=True)
        self._run(
            ["apt-get", *self._options(), "-qq", "source", "--download-only", f"{name}={version}"],
            cwd=dest,
        )
        return sorted(p for p in dest.iterdir() if p.is_file())

    def download(self, names: list[str], dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        self._run(["apt-get", *self._options(), "-qq", "download", *names], cwd=dest)
        return sorted(dest.glob("*.deb"))
