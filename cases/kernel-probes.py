"""Kernel probes: how the kernel answers FUSE_INIT and FUSE-over-io_uring misuse."""

# Guards: fs/fuse/dev_uring.c REGISTER/COMMIT checks and process_init_reply() flags2 (kernel).
# What each probe pins: fuse_uring_cmd() checks SQE128 first, then !fc->initialized -> EAGAIN,
# and a failed REGISTER sets fc->io_uring = 0; fuse_uring_register() wants qid <
# num_possible_cpus(); fuse_uring_create_ring_ent() a payload >= max(FUSE_MIN_READ_BUFFER,
# max_write, max_pages * PAGE_SIZE); is_ring_ready() needs an entry on every qid;
# fuse_uring_commit_fetch() answers an unknown commit_id with ENOENT and keeps the request;
# inode.c process_init_reply() ignores flags2 without INIT_EXT.
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harness.iotests.probe import Client, Completion, Probe, Served
from harness.iotests.steps import Session
from harness.kernel import abi
from harness.layout import possible_cpus

SPEC = {
    "id": "kernel-probes",
    "description": "the kernel's answers to FUSE_INIT variants and io_uring REGISTER/COMMIT misuse",
    "groups": ["negotiation"],
    # partial-register needs a second ring queue, and a case is run or not as a
    # whole: on a machine with one possible CPU none of the probes run.
    "requires": {"cpus": 2},
    "targets": ["reference"],  # the harness is the FUSE server: no target to test
    "transports": ["uring"],
    "matrix": {
        "probe": [
            "no-init-ext",
            "register-before-init",
            "small-payload",
            "bad-qid",
            "no-sqe128",
            "partial-register",
            "bad-commit-id",
        ]
    },
    "timeout": 20,
}

CLIENT_CPU = 0  # the client is pinned here, so its requests go to ring queue (qid) 0
PREAD = (0, 4096)


def _start(s: Session) -> Probe:
    """Mount a probe and read the kernel's FUSE_INIT."""
    p = Probe(s.workdir, s)
    p.mount()
    init = p.read_init()
    s.log(f"kernel FUSE_INIT: protocol {init.major}.{init.minor}")
    s.log(f"kernel offers: {' '.join(init.flag_names)}")
    return p


def _where(served: list[Served]) -> str:
    vias = {s.via for s in served}
    if vias == {"dev"}:
        return "/dev/fuse"
    if vias == {f"qid{CLIENT_CPU}"}:
        return "the ring, on the client's qid"
    return "mixed: " + " ".join(f"{s.op}@{s.via}" for s in served)


def _register_once(
    p: Probe, qid: int, *, sqe128: bool = True, payload_size: int | None = None
) -> Completion:
    """REGISTER one entry on a new ring and wait (bounded) for a refusal's CQE."""
    r = p.ring(sqe128=sqe128)
    r.register(qid, payload_size=payload_size)
    return p.wait_completion(r, "the CQE of REGISTER")


def _start_client(s: Session, p: Probe) -> Client:
    s.log(f"client pread {PREAD[0]} {PREAD[1]}, pinned to the CPU of qid {CLIENT_CPU}")
    return p.client("pread", *PREAD, cpu=CLIENT_CPU)


def _finish_client(s: Session, p: Probe, c: Client) -> None:
    """Serve until the client has exited and its file was released; log both,
    and any ring command the kernel refused meanwhile."""
    p.serve(lambda: c.done() and any(x.op == "RELEASE" for x in p.served), "client and RELEASE")
    served = p.take_served()
    ops = " ".join(x.op + (f"={x.error}" if x.error else "") for x in served)
    s.log(f"client: {c.result()}")
    s.log(f"served on {_where(served)}: {ops}")
    refused = sorted({f"{r.cmd} {r.result}" for r in p.take_refused()})
    if refused:
        s.log(f"refused meanwhile: {', '.join(refused)}")


def _pread(s: Session, p: Probe) -> None:
    _finish_client(s, p, _start_client(s, p))


def _accepted(s: Session, p: Probe, what: str) -> None:
    """A REGISTER is pending (its CQE only comes with a request): no CQE for a
    short bound.  A kernel that answers at once is shown with its answer."""
    answers = sorted({c.result for c in p.drain()})
    if answers:
        s.log(f"{what}: answered at once: {', '.join(answers)}")
    else:
        s.log(f"{what}: no CQE within 0.3 s (accepted)")


def _register_all(s: Session, p: Probe) -> None:
    r = p.ring()
    for qid in range(possible_cpus()):
        r.register(qid)
    _accepted(s, p, "REGISTER one entry on every qid")


def _reply(s: Session, p: Probe, **kw: Any) -> None:
    """Answer FUSE_INIT and log what was written."""
    written = p.reply_init(**kw)
    low = " ".join(abi.flag_names(written & 0xFFFFFFFF))
    high = " ".join(abi.flag_names(written >> 32 << 32)) or "none"
    s.log(
        f"reply FUSE_INIT: flags {low}; flags2 {high}; "
        f"max_write={p.max_write} max_pages={p.max_pages}"
    )


def no_init_ext(s: Session) -> None:
    # Without INIT_EXT the kernel ignores flags2, so OVER_IO_URING is not
    # negotiated (inode.c process_init_reply) and no request waits for the
    # ring.  Up to 6.18, fuse_uring_cmd() only refuses REGISTER when
    # enable_uring is off: REGISTER is accepted and, once every qid has an
    # entry (is_ring_ready), the connection moves to the ring anyway.  7.3
    # refuses it with EOPNOTSUPP (golden/known/kernel.yaml).
    s.log("probe no-init-ext: OVER_IO_URING in flags2 of an INIT reply without INIT_EXT")
    p = _start(s)
    _reply(s, p, init_ext=False, over_io_uring=True)
    r = p.ring()
    r.register(0)
    _accepted(s, p, "REGISTER qid 0")
    _pread(s, p)
    for qid in range(1, possible_cpus()):
        r.register(qid)
    _accepted(s, p, "REGISTER the other qids")
    _pread(s, p)


def register_before_init(s: Session) -> None:
    # fuse_uring_cmd(): !fc->initialized -> EAGAIN, checked before the REGISTER
    # branch, so it does not turn io_uring off: REGISTER works after the reply.
    s.log("probe register-before-init: REGISTER before the FUSE_INIT reply is written")
    p = _start(s)
    r = p.ring()
    r.register(0)
    c = p.wait_completion(r, "the CQE of an early REGISTER")
    s.log(f"REGISTER qid 0 before the INIT reply: {c.result}")
    _reply(s, p)
    _register_all(s, p)
    _pread(s, p)


def small_payload(s: Session) -> None:
    # fuse_uring_create_ring_ent(): the payload iovec must hold
    # max(FUSE_MIN_READ_BUFFER, max_write, max_pages * PAGE_SIZE), so with
    # max_pages * 4 KiB > max_write a max_write-sized buffer is EINVAL.  A
    # failed REGISTER sets fc->io_uring = 0 (fuse_uring_cmd): requests stop
    # waiting for the ring and go to /dev/fuse.
    s.log("probe small-payload: REGISTER with a payload smaller than max_pages * 4 KiB")
    p = _start(s)
    _reply(s, p, max_write=64 * 1024, max_pages=64)
    c = _register_once(p, 0, payload_size=64 * 1024)
    s.log(f"REGISTER qid 0 with a 65536-byte payload ({p.payload_size} needed): {c.result}")
    _pread(s, p)


def bad_qid(s: Session) -> None:
    # fuse_uring_register(): qid >= ring->nr_queues (num_possible_cpus()) ->
    # EINVAL; like every failed REGISTER it turns io_uring off.
    s.log("probe bad-qid: REGISTER on a qid >= the number of possible CPUs")
    p = _start(s)
    _reply(s, p)
    c = _register_once(p, possible_cpus())
    s.log(f"REGISTER qid = number of possible CPUs (cpus={possible_cpus()}): {c.result}")
    _pread(s, p)


def no_sqe128(s: Session) -> None:
    # fuse_uring_cmd(): !(issue_flags & IO_URING_F_SQE128) -> EINVAL, checked
    # before anything else, so io_uring stays on and requests keep waiting for
    # the ring until a proper (SQE128) ring registers every qid.
    s.log("probe no-sqe128: REGISTER from a ring set up without IORING_SETUP_SQE128")
    p = _start(s)
    _reply(s, p)
    c = _register_once(p, 0, sqe128=False)
    s.log(f"REGISTER qid 0 on a 64-byte-SQE ring: {c.result}")
    c = _client_waits(s, p, "io_uring stays on, requests wait for the ring")
    r = p.ring()
    for qid in range(possible_cpus()):
        r.register(qid)
    s.log("REGISTER one entry on every qid on an SQE128 ring")
    _finish_client(s, p, c)


def _client_waits(s: Session, p: Probe, why: str) -> Client:
    """Start a client and show for a short bound that no request reaches us."""
    c = _start_client(s, p)
    quiet = p.stays_false(
        lambda: p.dev_readable() or p.ring_pending() or c.done(), "a request or the client's exit"
    )
    if quiet:
        s.log(f"no request within 0.3 s, client still waiting ({why})")
    else:
        s.log(f"UNEXPECTED: a request or the client's exit within 0.3 s: {p.report()}")
    return c


def partial_register(s: Session) -> None:
    # is_ring_ready(): the ring is used (fiq->ops switched, blocked requests
    # woken) only once every qid has an available entry; until then, with
    # OVER_IO_URING negotiated, fuse_block_alloc() holds every request, even
    # one whose own qid has an entry.  Needs 2 possible CPUs (SPEC requires).
    s.log("probe partial-register: REGISTER on qid 0 only, then on the other qids")
    p = _start(s)
    _reply(s, p)
    r = p.ring()
    r.register(0)
    _accepted(s, p, f"REGISTER qid 0 only (cpus={possible_cpus()})")
    c = _client_waits(s, p, "the ring is not ready until every qid has an entry")
    for qid in range(1, possible_cpus()):
        r.register(qid)
    s.log("REGISTER the other qids")
    _finish_client(s, p, c)


def bad_commit_id(s: Session) -> None:
    # fuse_uring_commit_fetch(): fuse_request_find() on the queue's processing
    # list fails for an unknown commit_id -> ENOENT; the request stays with its
    # entry (still FRRS_USERSPACE), so the client waits and a later commit with
    # the right id completes it.
    s.log("probe bad-commit-id: COMMIT_AND_FETCH with a commit_id no request has")
    p = _start(s)
    _reply(s, p)
    _register_all(s, p)
    r = p.rings[-1]
    client = _start_client(s, p)
    first = p.wait_completion(r, "the first request on the ring")
    opcode = p.load(first)
    s.log(f"request {abi.op_name(opcode)} arrived on qid {first.entry.qid}")
    p.prepare_reply(first.entry)
    r.commit(first.entry, commit_id=first.entry.commit_id + (1 << 32))
    bad = p.wait_completion(r, "the CQE of the wrong COMMIT_AND_FETCH")
    s.log(f"COMMIT_AND_FETCH with a wrong commit_id: {bad.result}")
    if p.stays_false(client.done, "the client's exit"):
        s.log("client still waiting after 0.3 s: the entry keeps the request")
    else:
        s.log(f"UNEXPECTED: the client exited: {client.result()}")
    r.commit(first.entry)
    s.log("COMMIT_AND_FETCH with the right commit_id")
    _finish_client(s, p, client)


PROBES: dict[str, Callable[[Session], None]] = {
    "no-init-ext": no_init_ext,
    "register-before-init": register_before_init,
    "small-payload": small_payload,
    "bad-qid": bad_qid,
    "no-sqe128": no_sqe128,
    "partial-register": partial_register,
    "bad-commit-id": bad_commit_id,
}


def run(s: Session) -> None:
    PROBES[s.params["probe"]](s)
