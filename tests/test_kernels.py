"""Kernel-version runs without booting anything: arguments, results, verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.iotests import compare, repro
from harness.iotests.vm import apt, kernels
from harness.iotests.vm.matrix import guest_args


def test_guest_args_drop_the_host_only_options() -> None:
    argv = ["--kernel", "6.1", "-fuse", "-g", "quick", "--accel=tcg", "--results", "r", "rw-seek"]
    assert guest_args(argv) == ["-fuse", "-g", "quick", "rw-seek"]
    assert guest_args(["--kernels=6.1,7.3", "--timeout-scale", "3", "-j", "2"]) == ["-j", "2"]


@pytest.mark.parametrize(
    ("want", "version", "ok"),
    [
        ("6.1", "6.1.176-1", True),
        ("6.1", "6.12.117-1", False),  # a series is not a prefix
        ("6.12", "6.12.117-1", True),
        ("7.3.4", "7.3.4-1~bpo13+1", True),
        ("7.3.4-1~bpo13+1", "7.3.4-1~bpo13+1", True),
        ("7.3.5", "7.3.4-1~bpo13+1", False),
    ],
)
def test_kernel_versions_by_series_or_version(want: str, version: str, ok: bool) -> None:
    assert kernels._matches(want, version) is ok


def test_a_kernel_argument_that_is_neither_is_one_line() -> None:
    with pytest.raises(kernels.KernelError, match="not a kernel version"):
        kernels.resolve("linux")
    with pytest.raises(kernels.KernelError, match="no such kernel image or tree"):
        kernels.resolve("/nonexistent/bzImage")


def test_the_mirror_comes_from_the_hosts_own_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    monkeypatch.setattr(apt, "SOURCES", tmp_path / "none")
    monkeypatch.setattr(apt, "SOURCE_PARTS", parts)
    assert apt.mirror() == (
        "http://mirror.example/debian",
        "/usr/share/keyrings/debian-archive-keyring.gpg",
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# a comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n"
    )
    monkeypatch.setattr(apt, "SOURCES", one_line)
    assert apt.mirror() == ("http://m.example/debian", "/k.gpg")
    monkeypatch.setattr(apt, "SOURCES", tmp_path / "none")
    (parts / "debian.sources").write_text("Types: deb\nURIs: http://x/\nSuites: jammy\n")
    with pytest.raises(apt.AptError, match="no Debian archive URI"):
        apt.mirror()


def _report(d: Path, kernel: str, results: list[dict[str, str]], vm: bool = False) -> Path:
    d.mkdir(parents=True)
    fp = {"kernel": kernel, "fuse": {"protocol": "7.45", "offered": ["INIT_EXT", "OVER_IO_URING"]}}
    if kernel.startswith("6.1."):
        fp["fuse"] = {"protocol": "7.38", "offered": ["INIT_EXT"]}
    (d / "report.json").write_text(json.dumps({"fingerprint": fp, "results": results}))
    if vm:
        (d / "vm.json").write_text(json.dumps({"kernel": kernel, "accel": "tcg", "booted": True}))
    return d


def test_compare_shows_fingerprint_status_and_transcript_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _report(tmp_path / "a", "6.18.44", [
        {"id": "x[uring]", "status": "pass", "output": "QA\nkernel offers: OVER_IO_URING\n"},
        {"id": "y[uring]", "status": "pass", "output": "QA\nok\n"},
    ])  # fmt: skip
    b = _report(tmp_path / "b", "6.1.176", [
        {"id": "x[uring]", "status": "fail", "output": "QA\nkernel offers:\n",
         "reason": "output mismatch"},
        {"id": "y[uring]", "status": "not run", "output": "", "reason": "enable_uring missing"},
    ], vm=True)  # fmt: skip
    assert compare.main([str(a), str(b / "report.json"), "--json", str(tmp_path / "c.json")]) == 1
    out = capsys.readouterr().out
    assert "  kernel: 6.18.44 -> 6.1.176" in out
    assert "  fuse protocol: 7.45 -> 7.38" in out
    assert "  fuse offered: -OVER_IO_URING" in out
    assert "  vm: none (the host) -> 6.1.176 (tcg)" in out
    assert "  x[uring]: pass -> fail  (output mismatch)" in out
    assert "  y[uring]: pass -> not run  (enable_uring missing)" in out
    assert "-kernel offers: OVER_IO_URING\n+kernel offers:\n" in out
    doc = json.loads((tmp_path / "c.json").read_text())
    assert [s["id"] for s in doc["status_changes"]] == ["x[uring]", "y[uring]"]
    assert list(doc["transcripts"]) == ["x[uring]"]
    assert compare.main([str(a), str(a)]) == 0
    assert compare.main([str(a), str(tmp_path / "nope")]) == 2
    assert compare.main(["--bogus"]) == 2


@pytest.mark.parametrize(
    ("status", "vm_booted", "code"),
    [
        ("pass", True, 0),
        ("fail", True, 1),
        ("xfail", True, 1),
        ("not run", True, 125),
        ("pass", False, 125),  # a VM that did not boot: nothing was tested
        (None, True, 125),  # no report at all
    ],
)
def test_repro_verdicts_are_what_git_bisect_run_wants(
    tmp_path: Path, status: str | None, vm_booted: bool, code: int
) -> None:
    if status is not None:
        results = [{"id": "i[legacy]", "status": status, "reason": "why"}]
        (tmp_path / "report.json").write_text(json.dumps({"results": results}))
    (tmp_path / "vm.json").write_text(json.dumps({"booted": vm_booted}))
    assert repro.verdict(tmp_path, "i[legacy]")[0] == code


def test_the_vm_command() -> None:
    from harness.iotests.lifecycle import REPO
    from harness.iotests.vm.run import vng_argv

    k = kernels.Kernel("6.1.176-1", Path("/k/boot/vmlinuz-6.1.0-50-amd64"), "6.1.0-50-amd64")
    argv = vng_argv(k, "tcg", "true", [REPO])
    assert argv[1:4] == ["--force-9p", "-r", "/k/boot/vmlinuz-6.1.0-50-amd64"]
    assert "--disable-kvm" in argv and ["--rwdir", str(REPO)] == argv[8:10]
    assert argv[-2:] == ["--exec", "true"]
    assert "--disable-kvm" not in vng_argv(k, "kvm", "true", [])


def test_a_kept_instance_directory_crosses_file_systems_without_its_sockets(
    tmp_path: Path,
) -> None:
    """A VM's instance directory moves from its /tmp to the results over 9p:
    copied, less the QMP socket a killed daemon left (copying one fails)."""
    import shutil
    import socket
    import tempfile

    from harness.iotests.runner import _keep

    src = Path(tempfile.mkdtemp(dir="/dev/shm"))  # tmpfs: another file system
    try:
        (src / "export0").mkdir()
        (src / "export0" / "export.stderr").write_text("daemon said\n")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(src / "export0" / "qmp.sock"))
        _keep(src, tmp_path / "kept")
        assert (tmp_path / "kept" / "export0" / "export.stderr").read_text() == "daemon said\n"
        assert not (tmp_path / "kept" / "export0" / "qmp.sock").exists()
        assert not src.exists()
    finally:
        shutil.rmtree(src, ignore_errors=True)
