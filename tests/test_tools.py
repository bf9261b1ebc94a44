"""The commands under tools/ work as a user runs them."""

from __future__ import annotations

import subprocess

import pytest

from harness.iotests.lifecycle import REPO


def test_tools_export_version_and_bad_option() -> None:
    ok = subprocess.run([REPO / "tools/export", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("fuse-iotests exporter ")
    bad = subprocess.run([REPO / "tools/export", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1].startswith("export: ")


@pytest.mark.usefixtures("fuse_root")
def test_tools_demo_passes() -> None:
    res = subprocess.run([REPO / "tools/demo"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "image holds the written bytes" in res.stdout


def test_readme_reference_is_current() -> None:
    """The README's reference tables are generated from the code."""
    from harness.iotests import readme

    text = readme.README.read_text()
    assert readme.render(text) == text, "stale: python -m harness.iotests.readme --write"
    assert "| `hold` |" in text and "| `queues` |" in text and "| `faults` |" in text
