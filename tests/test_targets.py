"""Targets: capabilities from recorded QMP schemas, what a target cannot run,
known differences, and the targets against real qemu-storage-daemon builds."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.iotests import known
from harness.iotests.context import Instance
from harness.iotests.lifecycle import REPO, child_env
from harness.iotests.runner import target_problem
from harness.iotests.spec import SpecError, load_spec
from harness.iotests.steps import CASE_DEFAULTS
from harness.iotests.targets import Target, qsd, resolve
from harness.iotests.targets.qsd import FETCHED, capabilities, export_arguments

DATA = Path(__file__).parent / "data"
CASES = REPO / "cases"
needs_qsd = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon not installed"
)


def recorded(version: str) -> list[dict]:
    """The block-export-add part of a real QSD's query-qmp-schema."""
    return json.loads((DATA / f"qsd-{version}-schema.json").read_text())["schema"]


def with_io_uring(schema: list[dict]) -> list[dict]:
    """What the FUSE-over-io_uring patches add: '*io-uring': 'bool' in the FUSE options."""
    schema = copy.deepcopy(schema)
    types = {e["name"]: e for e in schema}
    args = types[types["block-export-add"]["arg-type"]]
    (fuse,) = [v for v in args["variants"] if v["case"] == "fuse"]
    types[fuse["type"]]["members"].append({"name": "io-uring", "type": "bool", "default": None})
    return schema


def test_capabilities_come_from_the_schema() -> None:
    assert capabilities(recorded("7.2.22")) == {"qmp"}
    assert capabilities(recorded("11.1.3")) == {"qmp", "multi-queue"}
    assert capabilities(with_io_uring(recorded("11.1.3"))) == {"qmp", "multi-queue", "io-uring"}
    assert capabilities([]) == frozenset()  # no block-export-add at all


def test_a_schema_with_io_uring_adds_the_export_with_it(tmp_path: Path) -> None:
    caps = capabilities(with_io_uring(recorded("11.1.3")))
    target = Target("qsd", "11.2.0", caps, qsd.OPTIONS)
    uring = CASE_DEFAULTS.with_({"io-uring": "on", "queues": 2})
    assert target.settings_problem(uring) is None
    args = export_arguments(uring, tmp_path / "mp")
    assert args["io-uring"] is True and args["iothread"] == ["iothread0", "iothread1"]
    assert "io-uring" not in export_arguments(CASE_DEFAULTS, tmp_path / "mp")
    plain = Target("qsd", "11.1.3", capabilities(recorded("11.1.3")), qsd.OPTIONS)
    assert plain.settings_problem(uring) == "target qsd-11.1.3 has no FUSE-over-io_uring"


QMP_ONLY = frozenset({"qmp"})  # QSD 7.2: a monitor, nothing else


@pytest.mark.parametrize(
    ("case", "via", "reason"),
    [
        ("race-faults", "legacy", "target qsd-7.2.22 has no fault injection"),
        ("eof-big-write", "legacy", "target qsd-7.2.22 has no export option 'max-write'"),
        ("layout-multiqueue", "legacy", "target qsd-7.2.22 has no multi-queue exports"),
        ("export-del", "uring", "target qsd-7.2.22 has no FUSE-over-io_uring"),
        ("kernel-probes", "uring", "the case is for target reference only"),
        ("export-del", "legacy", None),
    ],
)
def test_what_a_target_cannot_run_is_decided_from_the_spec(
    case: str, via: str, reason: str | None
) -> None:
    spec = load_spec(next(CASES.glob(f"{case}.*")))
    inst = next(i for i in spec.instances() if i.transport == via).on("qsd")
    assert (
        target_problem(spec, spec.plan(inst), Target("qsd", "7.2.22", QMP_ONLY, qsd.OPTIONS))
        == reason
    )


@pytest.mark.parametrize(
    ("depth", "reason"),
    [
        ("1", "target qsd-11.2.0 has no export option 'ring-depth' (always 64)"),
        ("64", None),  # its own depth: runs, without the option
    ],
)
def test_an_option_a_target_lacks_narrows_the_matrix_to_its_own_value(
    depth: str, reason: str | None
) -> None:
    spec = load_spec(CASES / "layout-depth.yaml")
    inst = next(i for i in spec.instances() if dict(i.params)["depth"] == int(depth)).on("qsd")
    caps = capabilities(with_io_uring(recorded("11.1.3")))
    target = Target("qsd", "11.2.0", caps, qsd.OPTIONS, fixed=qsd.FIXED)
    assert target_problem(spec, spec.plan(inst), target) == reason


def test_version_constraints_and_id_globs() -> None:
    assert known.version_matches("7.2.22", "7.2.*")
    assert not known.version_matches("11.1.3", "7.2.*")
    assert known.version_matches("6.18.44-fc-v1098", ">=6.16,<7.0")
    assert known.version_matches("7.3.4", "==7.3") and not known.version_matches("7.3.4", "<7.3")
    glob = known.id_glob("eof-dd[*growable=off]")
    assert glob.fullmatch("eof-dd[legacy-growable=off]")
    assert not glob.fullmatch("eof-dd[legacy-growable=on]")


def test_known_differences_match_target_version_and_kernel(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "# test\nwhen: {target: qsd, version: '7.2.*', kernel: '<7.3'}\n"
        "differences:\n  - instances: ['rw-seek[*]']\n    reason: r\n"
    )
    k = known.load(tmp_path)
    inst = Instance("rw-seek", "fuse", "legacy", (), "qsd")
    assert k.match(inst, known.Environment("qsd", "7.2.22", "6.18.0"))
    assert not k.match(inst, known.Environment("qsd", "7.2.22", "7.3.4"))
    assert not k.match(inst, known.Environment("qsd", "11.1.3", "6.18.0"))
    assert not k.match(inst, known.Environment("reference", "0.1.0", "6.18.0"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a list\n", ":1: a known-differences file is a mapping"),
        ("when: {target: qsd}\n", ":1: a known-differences file lists differences, defects"),
        ("when: {target: qsd}\ndifferences: []\n", ":2: differences must be a non-empty list"),
        (
            "when: {target: qsd}\ndefects:\n  - {instances: 'a[*]', reason: r}\n",
            ":3: a defect has evidence, first-bad, instances, iothreads, reason, repro, signature",
        ),
        (
            "when: {target: qsd}\ndefects:\n  - {instances: 'a[*]', reason: r, signature: '(',"
            " evidence: e, first-bad: p, transports: [uring], iothreads: '1', repro: c}\n",
            ":3: signature: not a regular expression",
        ),
        (
            "when: {target: qsd}\ndefects:\n  - {instances: 'a[*]', reason: r, signature: x,"
            " evidence: e, first-bad: p, transports: [tcp], iothreads: '1', repro: c}\n",
            ":3: transports: a list of legacy and/or uring",
        ),
        ("when: {tagret: qsd}\ndifferences: [{instances: 'a[*]', reason: r}]\n", ":1: when:"),
        ("when: {kernel: '<<7'}\ndifferences: [{instances: 'a[*]', reason: r}]\n", "when.kernel"),
        ("when: {target: qsd}\ndifferences:\n  - {instances: 'a[*]'}\n", ":3: an entry has"),
        (
            "when: {target: qsd}\ndifferences:\n"
            "  - {instances: 'a[*]', reason: r, intermittent: 1}\n",
            ":3: intermittent: true or false",
        ),
        (
            "when: {target: qsd}\ndifferences:\n  - {instances: rw-seek, reason: r}\n",
            ":3: instances",
        ),
    ],
)
def test_bad_known_difference_files_name_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(SpecError) as e:
        known.load(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "bad.yaml")) and message in str(e.value)


def test_every_known_difference_file_loads_and_names_real_cases() -> None:
    k = known.load(REPO / "golden" / "known")
    ids = {i.on("").id for p in CASES.iterdir() if p.suffix in (".yaml", ".py")
           for i in load_spec(p).instances()}  # fmt: skip
    for e in k.entries:
        for pattern in e.patterns:
            assert any(known.id_glob(pattern).fullmatch(i) for i in ids), (e.where, pattern)


# -- against the real qemu-storage-daemon -------------------------------------


def check(golden: Path, *args: str) -> subprocess.CompletedProcess[str]:
    results = golden.parent / "results"
    argv = [
        sys.executable, "-m", "harness.iotests.check",
        "--golden", str(golden), "--results", str(results), *args,
    ]  # fmt: skip
    return subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=child_env()
    )


@pytest.fixture
def golden_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "golden"
    shutil.copytree(REPO / "golden", dest)
    return dest


@needs_qsd
@pytest.mark.usefixtures("fuse_root")
def test_listed_difference_is_xfail_and_unlisting_it_fails(golden_copy: Path) -> None:
    listed = check(golden_copy, "--target", "qsd", "-fuse", "rw-seek")
    assert listed.returncode == 0, listed.stdout
    assert "Known differences (xfail): rw-seek[qsd-legacy]" in listed.stdout
    qsd_yaml = golden_copy / "known" / "qsd.yaml"
    text = qsd_yaml.read_text()
    qsd_yaml.write_text(text.replace('["rw-seek[*]"]', '["rw-seek-gone[*]"]'))
    unlisted = check(golden_copy, "--target", "qsd", "-fuse", "rw-seek")
    assert unlisted.returncode == 1
    assert "Failures: rw-seek[qsd-legacy]" in unlisted.stdout
    assert "-lseek hole 1048576: ENXIO\n+lseek hole 1048576: 1048576" in unlisted.stdout


@needs_qsd
@pytest.mark.usefixtures("fuse_root")
def test_a_wrong_entry_is_xpass_and_fails_the_run(golden_copy: Path) -> None:
    (golden_copy / "known" / "wrong.yaml").write_text(
        "# wrong on purpose\nwhen: {target: qsd}\n"
        "differences:\n  - instances: ['rw-patterns[*]']\n    reason: not so\n"
    )
    res = check(golden_copy, "--target", "qsd", "-fuse", "rw-patterns")
    assert res.returncode == 1
    assert (
        "Listed as known differences or defects but passed (xpass): rw-patterns[qsd-legacy]"
        in res.stdout
    )
    assert "known/wrong.yaml:4 lists it: remove the entry" in res.stdout
    # An intermittent difference is not an xpass when the instance happens to match.
    wrong = golden_copy / "known" / "wrong.yaml"
    wrong.write_text(wrong.read_text() + "    intermittent: true\n")
    res = check(golden_copy, "--target", "qsd", "-fuse", "rw-patterns")
    assert res.returncode == 0 and "Passed all 1 iotests" in res.stdout, res.stdout


@needs_qsd
@pytest.mark.usefixtures("fuse_root")
def test_diff_targets_compares_transcripts(golden_copy: Path) -> None:
    res = check(golden_copy, "--diff-targets", "reference,qsd", "-fuse", "rw-seek", "rw-patterns")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "=== reference-0.1.0 vs qsd-7.2.22 ===" in out
    assert "rw-patterns[legacy]" in out and "same" in out.split("rw-patterns[legacy]")[-1][:20]
    assert "rw-seek[legacy]" in out and "different (known)" in out
    assert "+lseek hole 1048576: 1048576" in out and "No unlisted differences" in out
    qsd_yaml = golden_copy / "known" / "qsd.yaml"
    qsd_yaml.write_text(qsd_yaml.read_text().replace('["rw-seek[*]"]', '["rw-seek-gone[*]"]'))
    res = check(golden_copy, "--diff-targets", "reference,qsd", "-fuse", "rw-seek")
    assert res.returncode == 1
    assert "Differ, not listed as known: rw-seek[legacy]" in res.stdout


@needs_qsd
@pytest.mark.usefixtures("fuse_root")
def test_qsd_target_is_detected_from_its_schema() -> None:
    binary = shutil.which("qemu-storage-daemon")
    assert binary is not None
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    t = qsd.detect("qsd", None)
    assert (t.name, t.label, t.binary) == ("qsd", f"qsd-{t.version}", binary)
    assert version.startswith(f"qemu-storage-daemon version {t.version} ")
    # Fault steps reach its block layer through the harness's NBD server.
    assert t.lacks({"faults"}) is None and t.holds.where == "block layer"
    assert t.holds_problem({"READ", "WRITE", "FSYNC"}) is None
    assert t.holds_problem({"GETATTR"}) == (
        f"target qsd-{t.version} cannot hold GETATTR requests (block layer holds only)"
    )
    assert t.lacks({"introspection"}) == f"target qsd-{t.version} has no export introspection " + (
        "(negotiation, queues and ring layout in query-block-exports)"
    )


@pytest.mark.usefixtures("fuse_root")
@pytest.mark.skipif(not FETCHED.exists(), reason="QSD 11.1 not fetched (tools/qsd fetch)")
def test_fetched_qsd_has_multi_queue_but_no_io_uring() -> None:
    t = qsd.detect("qsd-11.1", "/ignored/for/qsd-11.1")
    assert t.binary == str(FETCHED)
    assert t.version.startswith("11.1.") and t.capabilities == {"qmp", "multi-queue", "faults"}


def test_reference_processes_puts_io_uring_queues_in_processes(tmp_path: Path) -> None:
    """The same exporter; --queue-processes only where io_uring is asked for,
    so legacy instances and io-uring=off read exactly as on the reference."""
    target = resolve("reference-processes")
    assert target.tag == "reference-processes" and not target.starts_warm
    for mode, want in (("on", True), ("auto", True), ("off", False)):
        settings = CASE_DEFAULTS.with_({"io-uring": mode})
        exp = target.exporter(tmp_path, tmp_path / "mp", None, settings)
        assert ("--queue-processes" in exp.command()) == want, mode


def _as_defect(golden: Path, signature: str) -> None:
    """rw-seek on QSD, listed as a defect instead of a difference."""
    qsd_yaml = golden / "known" / "qsd.yaml"
    qsd_yaml.write_text(qsd_yaml.read_text().replace('["rw-seek[*]"]', '["rw-seek-gone[*]"]'))
    (golden / "known" / "defect.yaml").write_text(
        "# a defect, for the test\nwhen: {target: qsd}\ndefects:\n"
        "  - instances: ['rw-seek[*]']\n    transports: [legacy]\n    iothreads: '1'\n"
        "    reason: SEEK_HOLE at EOF\n    evidence: the diff\n    first-bad: none\n"
        "    repro: tools/check --target qsd rw-seek\n"
        f"    signature: '{signature}'\n"
    )


@needs_qsd
@pytest.mark.usefixtures("fuse_root")
def test_a_listed_defect_is_counted_apart_and_only_for_its_signature(golden_copy: Path) -> None:
    _as_defect(golden_copy, r"\+lseek hole 1048576: 1048576")
    res = check(golden_copy, "--target", "qsd", "-fuse", "rw-seek")
    assert res.returncode == 0, res.stdout
    assert "Known defects (xfail): rw-seek[qsd-legacy]" in res.stdout
    assert "Passed 0 of 1 iotests, 1 known defects" in res.stdout
    assert "known defect, known/defect.yaml:4: SEEK_HOLE at EOF (first bad: none)" in res.stdout
    doc = json.loads((golden_copy.parent / "results" / "report.json").read_text())
    assert doc["summary"]["xfail-defect"] == 1 and doc["summary"]["xfail-difference"] == 0
    assert doc["results"][0]["known"] == "defect"
    junit = (golden_copy.parent / "results" / "junit.xml").read_text()
    assert 'known-defects="1"' in junit and 'message="xfail (defect):' in junit
    # The same instance failing some other way is a failure, not the defect.
    _as_defect(golden_copy, r"Segmentation fault")
    res = check(golden_copy, "--target", "qsd", "-fuse", "rw-seek")
    assert res.returncode == 1 and "Failures: rw-seek[qsd-legacy]" in res.stdout, res.stdout
