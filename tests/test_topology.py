"""CPU topologies: reading them, naming CPUs in cases, VM shapes, and putting
a CPU the harness took offline back, even after the run was SIGKILLed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.iotests import compare, known
from harness.iotests.check import main as check_main
from harness.iotests.context import Instance
from harness.iotests.evidence import ring_summary
from harness.iotests.lifecycle import REPO, child_env
from harness.iotests.runner import cpu_problem
from harness.iotests.spec import SpecError
from harness.iotests.steps.host import named_cpu
from harness.iotests.vm.matrix import guest_args, split_variant
from harness.iotests.vm.run import VmCpus
from harness.iotests.waiting import wait_until
from harness.kernel import cpus
from harness.kernel.mount import mount_table
from harness.kernel.params import kernel_lock


def _sysfs(tmp_path: Path, possible: str, present: str, online: str) -> Path:
    for name, text in (("possible", possible), ("present", present), ("online", online)):
        (tmp_path / name).write_text(text + "\n")
    return tmp_path


def test_topology_reads_the_kernels_lists(tmp_path: Path) -> None:
    topo = cpus.Topology.read(_sysfs(tmp_path, "0-3", "0-3", "0-1"))
    assert topo.possible == (0, 1, 2, 3) and topo.online == (0, 1) and topo.offline == (2, 3)
    assert topo.describe() == "possible 0-3, present 0-3, online 0-1"
    assert cpus.format_cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert cpus.format_cpu_list([]) == "none"


@pytest.mark.parametrize(
    ("possible", "online", "last", "spare"),
    [
        ("0-1", "0-1", 1, 1),  # this host
        ("0-1", "0", 1, None),  # its CPU 1 offline
        ("0-3", "0-1", 3, 1),  # a VM booted with maxcpus=2 of 4
        ("0-3", "0,2", 3, 2),
        ("0", "0", 0, None),  # one CPU: nothing to take away
    ],
)
def test_named_cpus_fit_every_topology(
    tmp_path: Path, possible: str, online: str, last: int, spare: int | None
) -> None:
    topo = cpus.Topology.read(_sysfs(tmp_path, possible, possible, online))
    assert named_cpu("last", topo) == last
    assert named_cpu("spare", topo) == spare
    assert named_cpu(1, topo) == (1 if 1 in topo.possible else None)


def test_a_case_that_needs_a_cpu_this_machine_lacks_is_not_run() -> None:
    assert cpu_problem({}) is None
    topo = cpus.Topology.read()
    lacking = named_cpu("spare", topo) is None or not cpus.hotpluggable(named_cpu("spare", topo))
    reason = cpu_problem({"cpu-spare": True, "hotplug": True})
    if lacking:  # a one-CPU machine: the reason names the topology and the way out
        assert reason is not None and "--cpus/--max-cpus" in reason and topo.describe() in reason
    else:
        assert reason is None


@pytest.mark.parametrize(
    ("text", "online", "possible", "args"),
    [
        ("2/4", 2, 4, ["--cpus", "4", "--append", "maxcpus=2"]),
        ("4", 4, 4, ["--cpus", "4"]),
        ("1/2", 1, 2, ["--cpus", "2", "--append", "maxcpus=1"]),
    ],
)
def test_vm_cpus_boot_all_possible_cpus_and_keep_some_offline(
    text: str, online: int, possible: int, args: list[str]
) -> None:
    # FACTS.md: -smp N,maxcpus=M leaves possible at N in a virtme-ng guest;
    # M CPUs with the kernel option maxcpus=N give N online of M possible.
    c = VmCpus.parse(text)
    assert (c.online, c.possible) == (online, possible)
    assert c.vng_args() == args
    assert VmCpus.parse(c.spelling) == c


@pytest.mark.parametrize("text", ["4/2", "0", "2/x", "", "2/4/8", "65"])
def test_a_topology_that_cannot_be_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="CPUs"):
        VmCpus.parse(text)


def test_kernels_take_topology_variants() -> None:
    default = VmCpus(2, 4)
    assert split_variant("7.3@2/4", None) == ("7.3", VmCpus(2, 4))
    assert split_variant("7.3@4", default) == ("7.3", VmCpus(4, 4))
    assert split_variant("6.12", default) == ("6.12", default)
    assert split_variant("/k/bzImage", None) == ("/k/bzImage", None)
    with pytest.raises(ValueError, match=r"7\.3@4/2: CPUs"):
        split_variant("7.3@4/2", None)
    argv = ["--kernel", "7.3", "--cpus", "2", "--max-cpus=4", "-g", "topology"]
    assert guest_args(argv) == ["-g", "topology"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpus", "2", "-n"], "need --kernel or --kernels"),
        (["--kernel", "7.3", "--cpus", "5", "--max-cpus", "4", "-n"], "5 online of 4 possible"),
        (["--kernels", "7.3@4/2", "-n"], "7.3@4/2: CPUs: 4 online of 2 possible"),
    ],
)
def test_bad_topology_arguments_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = check_main(argv)
    except SystemExit as e:  # argparse's p.error
        code = int(e.code or 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err


def _mounts_of(case: str) -> list[str]:
    return [e.mountpoint for e in mount_table() if e.is_fuse and f"/{case}-" in e.mountpoint]


OFFLINE_AND_STUCK = """\
# Guards: nothing; a test fixture that takes CPU `last` offline and blocks on a held READ.
id: {case}
description: CPU last offline, then a foreground read that never completes
groups: [quick]
serial: true
timeout: 120
steps:
  - cpu-offline: last
  - hold: {{name: h, op: read}}
  - echo: "about to block"
  - read: {{offset: 0, length: 4k}}
"""


@pytest.mark.usefixtures("fuse_root")
def test_a_cpu_taken_offline_by_a_killed_run_is_put_back_by_cleanup(tmp_path: Path) -> None:
    """The run dies by SIGKILL with CPU `last` offline: the registry says so,
    and `check --cleanup` brings the CPU back and says so."""
    topo = cpus.Topology.read()
    last = named_cpu("last", topo)
    if last is None or not cpus.hotpluggable(last) or last not in topo.online:
        pytest.skip(f"needs a second CPU that is online and can go offline ({topo.describe()})")
    case = f"cpu-sigkill-{os.getpid()}"
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / f"{case}.yaml").write_text(OFFLINE_AND_STUCK.format(case=case))
    env = {**child_env(), "FUSE_IOTESTS_STATE_DIR": str(tmp_path / "runs")}
    argv = [
        sys.executable, "-m", "harness.iotests.check", "--cases", str(tmp_path / "cases"),
        "--golden", str(tmp_path / "golden"), "--results", str(tmp_path / "res"), case,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: _mounts_of(case) and not cpus.is_online(last), 60, f"CPU {last} offline")
        (state,) = (tmp_path / "runs").glob("*.json")
        assert json.loads(state.read_text())["cpus"] == {str(last): True}
        proc.kill()
        proc.wait(10)
        assert not cpus.is_online(last)  # the leak a SIGKILL leaves
        res = subprocess.run(
            [sys.executable, "-m", "harness.iotests.check", "--cleanup"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert f"cleanup: removed the offline state of CPU {last}, left by the dead run" in (
            res.stderr
        )
        assert "could NOT" not in res.stderr
        assert cpus.is_online(last)
        assert not list((tmp_path / "runs").glob("*.json"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(  # whatever an assertion above left: this run's registry only
            [sys.executable, "-m", "harness.iotests.check", "--cleanup"],
            cwd=REPO, env=env, capture_output=True, timeout=60,
        )  # fmt: skip
        with kernel_lock(exclusive=True):  # no instance of ours runs meanwhile
            if not cpus.is_online(last):  # we took it down: put it back
                cpus.set_online(last, True)


def test_known_entries_can_depend_on_the_cpus_a_run_found(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "# test\nwhen: {target: qsd, cpus: some-offline}\n"
        "differences:\n  - instances: ['rw-seek[*]']\n    reason: r\n"
    )
    k = known.load(tmp_path)
    inst = Instance("rw-seek", "fuse", "uring", (), "qsd")
    assert k.match(inst, known.Environment("qsd", "1", "7.3.4", cpus="some-offline"))
    assert not k.match(inst, known.Environment("qsd", "1", "7.3.4", cpus="all-online"))
    (tmp_path / "a.yaml").write_text(
        "# test\nwhen: {target: qsd, cpus: 2of4}\ndifferences:\n  - {instances: ['x'], reason: r}\n"
    )
    with pytest.raises(SpecError, match=r"when\.cpus: one of all-online, some-offline"):
        known.load(tmp_path)


def test_compare_shows_the_topology(tmp_path: Path) -> None:
    def run(online: str, vm_cpus: str) -> compare.Run:
        fp = {"kernel": "7.3.4", "cpus": {"possible": "0-3", "present": "0-3", "online": online}}
        vm = {"kernel": "7.3.4-1", "accel": "tcg", "cpus": vm_cpus}
        return compare.Run(str(tmp_path), fp, {}, vm)

    c = compare.compare(
        run("0-1", "2 online of 4 possible CPUs"), run("0-3", "4 online of 4 possible CPUs")
    )
    assert c.fingerprint["cpus online"] == ["0-1", "0-3"]
    assert c.fingerprint["vm"] == [
        "7.3.4-1 (tcg, 2 online of 4 possible CPUs)",
        "7.3.4-1 (tcg, 4 online of 4 possible CPUs)",
    ]
    assert "cpus possible" not in c.fingerprint  # the same on both sides


def test_a_hang_report_shows_the_rings_beside_the_cpus() -> None:
    text = ring_summary([os.getpid()])  # this process has no FUSE ring
    assert "0 ring(s) with FUSE entries in flight: none" in text
    assert f"CPUs: {cpus.Topology.read().describe()}" in text
