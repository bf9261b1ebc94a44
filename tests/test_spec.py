"""The case model: parsing, validation errors with file:line, matrix expansion."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.iotests.context import Instance
from harness.iotests.spec import SpecError, load_all, load_spec

GOOD = """\
# Guards: nothing; a test fixture.
id: demo
description: a demo case
groups: [quick, rw]
matrix:
  growable: [false, true]
export: {growable: $growable}
steps:
  - write: {offset: 0, length: 4k, pattern: 0xab}
  - read: {offset: 0, length: 4k, pattern: 0xab}
"""


CASES = Path(__file__).resolve().parent.parent / "cases"


def write_case(tmp_path: Path, text: str, name: str = "demo") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, name: str = "demo") -> str:
    with pytest.raises(SpecError) as e:
        load_spec(write_case(tmp_path, text, name))
    return str(e.value)


def test_good_spec_expands_into_transport_instances(tmp_path: Path) -> None:
    spec = load_spec(write_case(tmp_path, GOOD))
    assert spec.guards == "nothing; a test fixture."
    assert [i.id for i in spec.instances()] == [
        "demo[legacy-growable=off]",
        "demo[legacy-growable=on]",
        "demo[uring-growable=off]",
        "demo[uring-growable=on]",
    ]


def test_modes_and_transports_restrict_instances(tmp_path: Path) -> None:
    text = GOOD.replace("groups:", "modes: [file, fuse]\ntransports: [uring]\ngroups:")
    ids = [i.id for i in load_spec(write_case(tmp_path, text)).instances()]
    assert ids == [
        "demo[file-growable=off]",
        "demo[file-growable=on]",
        "demo[uring-growable=off]",
        "demo[uring-growable=on]",
    ]


def test_explicit_matrix_combinations(tmp_path: Path) -> None:
    text = GOOD.replace(
        "matrix:\n  growable: [false, true]\n",
        "matrix:\n  - {growable: false, n: 4k}\n  - {growable: true, n: 8k}\n",
    ).replace("length: 4k, pattern: 0xab}\n  - read", "length: $n, pattern: 0xab}\n  - read")
    spec = load_spec(write_case(tmp_path, text))
    assert [i.param_key for i in spec.instances()] == [
        "growable=off,n=4k",
        "growable=on,n=8k",
    ] * 2


def test_instance_id_without_params() -> None:
    assert Instance("c", "fuse", "uring").id == "c[uring]"
    assert Instance("c", "file", None).id == "c[file]"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("groups:", "colour: red\ngroups:", ":4: unknown key 'colour'"),
        ("groups: [quick, rw]", "groups: quick", ":4: groups must be a non-empty list"),
        ("  - read:", "  - frobnicate: 1\n  - read:", ":10: step 'frobnicate': unknown step"),
        ("pattern: 0xab}\n  - read", "pattern: 0x1ab}\n  - read", ":9: step 'write': pattern"),
        (
            "offset: 0, length: 4k, pattern: 0xab}\n  - read",
            "offset: 0}\n  - read",
            ":9: step 'write': missing argument 'length'",
        ),
        (
            "export: {growable: $growable}",
            "export: {growable: true}",
            ":6: matrix.growable is never",
        ),
        ("$growable}", "$growable, writable: $writeable}", ":7: unknown reference $writeable"),
        (
            "export: {",
            "export: {queues: two, ",
            ":7: export: queues: 'two' is not a positive integer",
        ),
        ("id: demo", "id: other", ":2: id 'other' must be the file name 'demo'"),
        ("# Guards: nothing; a test fixture.\n", "", ":1: missing the '# Guards:"),
        ("description: a demo case\n", "", "missing required key 'description'"),
        ("groups:", "transports: [legacy, carrier-pigeon]\ngroups:", "unknown value 'carrier"),
        ("groups:", "description: again\ngroups:", ":4: duplicate key 'description'"),
        ("steps:", "steps: [\n", ": YAML: "),
        (
            "  - read:",
            "  - qmp: {execute: quit, arguments: 5}\n  - read:",
            ":10: step 'qmp': arguments",
        ),
        (
            "  - read:",
            "  - wait: nobody\n  - read:",
            ":10: step 'wait': no earlier step defines client",
        ),
        (
            "  - read:",
            "  - release: h9\n  - read:",
            ":10: step 'release': no earlier step defines rule",
        ),
        (
            "  - read:",
            "  - cycles: {count: 2}\n  - read:",
            ":10: step 'cycles' needs the case to run alone",
        ),
        (
            "  - read:",
            "  - kernel-param: {enable_uring: N}\n  - read:",
            ":10: step 'kernel-param' needs",
        ),
        ("groups:", "timeout: 0\ngroups:", ":4: timeout must be positive"),
        ("export: {", "export: {queues: 0, ", ":7: export: queues: 0 is not a positive integer"),
        ("[false, true]", "[false, a/b]", ":6: matrix.growable: 'a/b' must be a plain word"),
        ("[false, true]", "[false, {x: 1}]", ":6: matrix.growable: {'x': 1} must be a plain word"),
        (
            "pattern: 0xab}\n  - read",
            "pattern: 0xab}\n  - dd: of=$TARGT\n  - read",
            ":10: unknown reference $TARGT",
        ),
        (
            "  - read:",
            "  - background: {name: b, op: pwrite, pattern: 300}\n  - read:",
            "pattern: 300 is not a byte",
        ),
    ],
)
def test_bad_specs_name_file_and_line(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in GOOD
    msg = error_of(tmp_path, GOOD.replace(old, new, 1))
    assert msg.startswith(str(tmp_path / "demo.yaml") + ":")
    assert expected in msg
    assert "\n" not in msg


def test_case_ids_cannot_contain_a_transport_name(tmp_path: Path) -> None:
    text = GOOD.replace("id: demo", "id: uring-demo")
    assert "must not contain 'uring'" in error_of(tmp_path, text, "uring-demo")


def test_export_steps_are_refused_in_file_mode(tmp_path: Path) -> None:
    text = GOOD.replace("groups:", "modes: [file]\ngroups:").replace(
        "export: {growable: $growable}\n", ""
    )
    text = text.replace("  - read:", "  - signal: TERM\n  - read:")
    text = text.replace("matrix:\n  growable: [false, true]\n", "")
    assert "step 'signal': needs a FUSE export" in error_of(tmp_path, text)


def test_one_bad_spec_does_not_hide_the_others(tmp_path: Path) -> None:
    write_case(tmp_path, GOOD)
    write_case(
        tmp_path, GOOD.replace("id: demo", "id: bad1").replace("groups:", "x: 1\ngroups:"), "bad1"
    )
    write_case(
        tmp_path,
        GOOD.replace("id: demo", "id: bad2").replace("  - read", "  - nope: 1\n  - read"),
        "bad2",
    )
    specs, errors = load_all(tmp_path)
    assert [s.id for s in specs] == ["demo"]
    assert len(errors) == 2
    assert "bad1.yaml:4: unknown key 'x'" in errors[0]
    assert "bad2.yaml:10: step 'nope'" in errors[1]


def test_python_case_needs_run(tmp_path: Path) -> None:
    path = tmp_path / "pycase.py"
    path.write_text(
        "# Guards: nothing.\nSPEC = {'id': 'pycase', 'description': 'd', 'groups': ['quick']}\n"
    )
    with pytest.raises(SpecError, match=r"pycase.py:1: a Python case must define run\(ctx\)"):
        load_spec(path)
    path.write_text(path.read_text() + "def run(ctx):\n    ctx.log('hello')\n")
    spec = load_spec(path)
    assert spec.python and [i.id for i in spec.instances()] == ["pycase[legacy]", "pycase[uring]"]


def test_every_shipped_case_loads() -> None:
    specs, errors = load_all(Path(__file__).resolve().parent.parent / "cases")
    assert errors == []
    assert len(specs) >= 10


def test_every_step_type_runs_in_every_mode() -> None:
    """tools/check -file, -fuse and FUSE_OVER_IO_URING=1 -fuse each use every step
    that their mode allows (StepDef.export and .fuse say which)."""
    from harness.iotests.steps import STEPS

    specs, _ = load_all(Path(__file__).resolve().parent.parent / "cases")
    used: dict[tuple[str, str | None], set[str]] = {
        ("file", None): set(),
        ("fuse", "legacy"): set(),
        ("fuse", "uring"): set(),
    }
    for spec in specs:
        names = spec.step_names()
        for inst in spec.instances():
            if "slow" not in spec.groups:
                used[(inst.mode, inst.transport)] |= names
    for (mode, transport), names in used.items():
        if mode == "fuse":
            want = set(STEPS)
        else:
            want = {n for n, sd in STEPS.items() if not (sd.export or sd.fuse)}
        assert want - names == set(), f"{mode} {transport}: no case uses {want - names}"


def test_cycles_cannot_hold_kernel_param(tmp_path: Path) -> None:
    text = GOOD.replace("groups:", "serial: true\ngroups:").replace(
        "  - read:", "  - cycles: {count: 2, steps: [{kernel-param: {enable_uring: N}}]}\n  - read:"
    )
    assert "'kernel-param' cannot run inside cycles" in error_of(tmp_path, text)


def test_export_steps_need_a_started_export(tmp_path: Path) -> None:
    text = GOOD.replace(
        "export: {growable: $growable}", "export: {growable: $growable, start: false}"
    )
    text = text.replace("  - read:", "  - signal: TERM\n  - read:")
    msg = error_of(tmp_path, text)
    assert ":10: step 'signal': needs an export, and none is running here" in msg
    text = text.replace("  - signal: TERM", "  - start-export\n  - signal: TERM")
    assert load_spec(write_case(tmp_path, text)).step_names() >= {"start-export", "signal"}


# -- plans: converted once, validated with the state that runs ---------------


def test_each_instance_has_a_plan_of_typed_steps(tmp_path: Path) -> None:
    spec = load_spec(write_case(tmp_path, GOOD))
    inst = spec.instances()[1]
    plan = spec.plan(inst)
    assert plan.settings is not None and plan.settings["growable"] is True
    assert [s.name for s in plan.steps] == ["write", "read"]
    assert plan.steps[0].value == {"offset": 0, "length": 4096, "pattern": 0xAB}
    assert plan.requires == {"root": True, "dev-fuse": True}
    assert spec.plan(inst.on("qsd")) is plan  # the same plan on any target


def test_enable_uring_n_needs_no_ring_in_the_kernel() -> None:
    """A kernel without FUSE-over-io_uring has the ring off: enable_uring=N
    is met there, and io-uring=on under it is to be refused, so it needs no
    usable ring; Y needs a kernel that has one."""
    spec = load_spec(CASES / "negotiation-disabled.yaml")
    for inst in spec.instances():
        req = spec.plan(inst).requires
        assert req.get("uring-off") and "uring" not in req and "kernel-uring" not in req
    spec = load_spec(CASES / "negotiation-off.yaml")
    by_value = {dict(i.params)["enable_uring"]: spec.plan(i).requires for i in spec.instances()}
    assert by_value["Y"].get("kernel-uring") and "kernel-uring" not in by_value["N"]


BACKGROUND = "  - background: {name: b, op: pread, offset: 0, length: 4k}\n"


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # A client is waited for once; a second wait would fail at run time.
        (BACKGROUND + "  - wait: b\n  - wait: b\n", ":13: step 'wait': client 'b' was waited for"),
        # ... and a running one cannot be started again under its name.
        (BACKGROUND + BACKGROUND, ":12: step 'background': client 'b' is still running"),
        # After cycles no export runs: a step that needs one is refused.
        ("  - cycles: {count: 1}\n  - signal: TERM\n", ":12: step 'signal': needs an export"),
        # A client started inside cycles must be waited for there.
        (
            "  - cycles: {count: 1, steps: [{background: {name: c, op: stat}}]}\n",
            ":11: step 'cycles': background client(s) c not waited for",
        ),
        ("  - release: nope\n", ":11: step 'release': no earlier step defines rule 'nope'"),
        # Each cycle runs a new exporter: a rule of the one before is not there.
        (
            "  - hold: {name: h, op: read}\n  - cycles: {count: 1, steps: [{release: h}]}\n",
            ":12: step 'release': no earlier step defines rule 'h'",
        ),
        (
            "  - hold: {name: h, op: read}\n  - cycles: {count: 1}\n  - start-export\n"
            "  - release: h\n",
            ":14: step 'release': no earlier step defines rule 'h'",
        ),
    ],
)
def test_the_validator_tracks_what_runs(tmp_path: Path, steps: str, expected: str) -> None:
    text = GOOD.replace("groups:", "serial: true\ngroups:").replace(
        "  - read: {offset: 0, length: 4k, pattern: 0xab}\n", steps
    )
    assert expected in error_of(tmp_path, text)


def test_a_new_step_is_its_definition_only(tmp_path: Path) -> None:
    """Registering a step is all it takes: the validator, the requirement
    check and the docs' step table read its metadata."""
    from harness.iotests.steps import STEPS, step, step_reference

    @step("x-probe", scalar=int, metavar="N", export=True, tools=("fio",), serial=True)
    def _probe(s: object, n: int) -> None:
        """A step defined by a test."""

    try:
        text = GOOD.replace("  - read:", "  - x-probe: 3\n  - read:")
        assert "step 'x-probe' needs the case to run alone" in error_of(tmp_path, text)
        spec = load_spec(write_case(tmp_path, text.replace("groups:", "serial: true\ngroups:")))
        assert spec.plan(spec.instances()[0]).requires["fio"] is True
        row = (
            "| `x-probe` | `N` | A step defined by a test. | export; serial cases only; runs fio |"
        )
        assert row in step_reference()
    finally:
        del STEPS["x-probe"]


# -- syntax errors and duplicate ids -------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # An unclosed flow list: the line that opened it, not where parsing gave up.
        ("groups: [quick, rw]", "groups: [quick, rw", ":4: YAML: a flow sequence opened here"),
        ("description: a demo case", 'description: "a demo case', ":3: YAML: a quoted scalar"),
        ("  - read: {", "   - read: {", ":10: YAML: expected <block end>"),
    ],
)
def test_yaml_syntax_errors_point_at_the_right_line(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert expected in error_of(tmp_path, GOOD.replace(old, new))


def test_python_errors_point_at_the_right_line(tmp_path: Path) -> None:
    case = tmp_path / "pycase.py"
    case.write_text('"""A case."""\n# Guards: x\nSPEC = {\n    "id": "pycase",\n  x =\n}\n')
    assert error_of_path(case) == f"{case}:5: Python: ':' expected after dictionary key"
    case.write_text('"""A case."""\n# Guards: x\n\nSPEC = {}\nraise RuntimeError("boom")\n')
    assert error_of_path(case) == f"{case}:5: import failed: RuntimeError: boom"


def test_two_files_with_one_case_id_are_both_refused(tmp_path: Path) -> None:
    write_case(tmp_path, GOOD)
    twin = tmp_path / "demo.py"
    twin.write_text('"""A case."""\n# Guards: x\nSPEC = {}\n')
    specs, errors = load_all(tmp_path)
    assert specs == []
    assert errors == [
        f"{twin}:1: case id 'demo' is also the id of {tmp_path / 'demo.yaml'}",
        f"{tmp_path / 'demo.yaml'}:1: case id 'demo' is also the id of {twin}",
    ]


def error_of_path(path: Path) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(path)
    return str(e.value)


def test_clients_and_rules_are_different_names(tmp_path: Path) -> None:
    """A rule and a client may share a name; waiting for the client does not
    use up the rule."""
    steps = (
        "  - hold: {name: h, op: read}\n"
        "  - background: {name: h, op: stat}\n  - wait: h\n  - release: h\n"
    )
    text = GOOD.replace("  - read: {offset: 0, length: 4k, pattern: 0xab}\n", steps)
    assert {"hold", "wait", "release"} <= load_spec(write_case(tmp_path, text)).step_names()
