"""The control socket speaks QMP: one qemu.qmp client drives us and QSD."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from qemu.qmp import ExecuteError

from harness.iotests.targets import resolve

needs_qsd = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon not installed"
)


def raw_session(path: str, *messages: dict) -> list[dict]:
    """Send messages on a fresh connection; return the greeting and replies."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        f = s.makefile("rw")
        replies = [json.loads(f.readline())]
        for m in messages:
            f.write(json.dumps(m))
            f.flush()
            replies.append(json.loads(f.readline()))
        return replies


def test_wire_format(exports):
    exp = exports.start()
    greeting, early, caps, unknown, bad = raw_session(
        str(exp.qmp_path),
        {"execute": "query-block-exports", "id": 1},
        {"execute": "qmp_capabilities"},
        {"execute": "frobnicate", "id": "x"},
        {"execute": "x-inject-fault", "arguments": {"action": "hold", "opcode": "nope"}},
    )
    assert greeting["QMP"]["capabilities"] == []
    assert greeting["QMP"]["version"]["package"].startswith("fuse-iotests ")
    assert early == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": 1,
    }
    assert caps == {"return": {}}
    assert unknown["error"]["class"] == "CommandNotFound" and unknown["id"] == "x"
    assert bad == {"error": {"class": "GenericError", "desc": "unknown opcode 'nope'"}}


def test_query_block_exports_fields(exports):
    exp = exports.start(queues=2, writable=True, growable=True)
    info = exp.query()
    assert info["type"] == "fuse" and info["id"] == "e0" and info["node-name"] == "n0"
    assert info["shutting-down"] is False
    assert (info["writable"], info["growable"], info["transport"]) == (True, True, "dev-fuse")
    neg = info["negotiation"]
    assert neg["kernel-major"] == 7 and neg["minor"] == min(neg["kernel-minor"], 45)
    # What we replied is what the kernel offered, intersected with ours.
    assert neg["replied"] & ~neg["offered"] == 0
    assert set(neg["replied-names"]) <= {
        "ASYNC_READ",
        "BIG_WRITES",
        "ASYNC_DIO",
        "MAX_PAGES",
        "INIT_EXT",
    }
    assert "INIT_EXT" in neg["replied-names"] and "OVER_IO_URING" not in neg["replied-names"]
    assert neg["max-pages"] * 4096 == neg["max-write"] == 128 * 1024
    assert [q["index"] for q in info["queues"]] == [0, 1]


def test_fault_rule_errors(exports):
    exp = exports.start()
    with pytest.raises(ExecuteError, match="delay needs a non-negative 'delay-ms'"):
        exp.inject("delay", opcode="read")
    with pytest.raises(ExecuteError, match="unknown errno 'EWHAT'"):
        exp.inject("fail", opcode="read", errno="EWHAT")
    with pytest.raises(ExecuteError, match="no fault rule 'f9'"):
        exp.release("f9")


@needs_qsd
@pytest.mark.parametrize("name", ["reference", "qsd"])
def test_one_client_drives_both(exports, name):
    exp = exports.start(target=resolve(name), writable=True, allow_other="off")
    (info,) = exp.cmd("query-block-exports")
    common = {k: info[k] for k in ("type", "id", "node-name", "shutting-down")}
    assert common == {"type": "fuse", "id": "e0", "node-name": "n0", "shutting-down": False}
    assert exp.cmd("block-export-del", id="e0") == {}
    event = exp.pull_event(wait=10)
    assert (event["event"], event["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "e0"})
    exp.wait_unmounted()
    if name == "qsd":
        assert exp.cmd("quit") == {}
    assert exp.wait_exit() == 0
