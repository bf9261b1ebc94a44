"""Block-layer holds for a daemon that exports a block node (QSD).

BlockLayerHolds is the part of an exporter process that puts the harness's
NBD server (server.py) between the daemon and the image and answers the
fault steps with it: the daemon gets `{"driver": "nbd", ...}` as the node it
exports instead of the image file, and hold / fail / delay / release /
wait-held act on the NBD requests it sends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..lifecycle import STOP_TIMEOUT, ExporterProcess
from ..timeouts import scaled
from ..waiting import wait_until
from . import Holds
from .server import COMMANDS, HoldServer

HOLDS = Holds("block layer", frozenset(COMMANDS))
T = TypeVar("T")
# How long a stop may take while requests are held before the daemon counts
# as waiting for them.  QEMU drains: quit, SIGTERM and block-export-del end
# an export only once its requests are done, so with a request held in the
# block layer it cannot finish, however long this is.
DRAIN_GRACE = 2.0


class BlockLayerHolds(ExporterProcess):
    """Mixed into a target's exporter process; `node()` before the export."""

    hold_server: HoldServer | None = None

    def hold_node(self, image: Path) -> dict[str, Any]:
        """The blockdev-add options of the image as seen through the server."""
        self.hold_server = HoldServer(image, self.workdir / "nbd.sock")
        server = {"type": "unix", "path": str(self.hold_server.path)}
        return {"driver": "nbd", "server": server}

    def _server(self) -> HoldServer:
        if self.hold_server is None:
            raise RuntimeError("this export was started without block-layer holds")
        return self.hold_server

    def inject(self, action: str, **args: Any) -> dict[str, Any]:
        kw = {k: args[k] for k in ("offset", "errno", "delay_ms", "count") if k in args}
        return self._server().inject(action, args["opcode"], **kw)

    def release(self, rule_id: str | None = None) -> int:
        return self._server().release(rule_id)

    def wait_held(self, rule_id: str, count: int = 1, timeout: float | None = None) -> None:
        server = self._server()
        wait_until(
            lambda: server.held(rule_id) == count,
            timeout or scaled(STOP_TIMEOUT),
            f"{count} block-layer request(s) held by {rule_id} (held: {server.held(rule_id)})",
            self.report,
        )

    def settle(self, fn: Callable[[], T], log: Callable[[str], None]) -> T:
        server = self.hold_server
        if server is None or not server.held():
            return fn()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as e:  # raised in the caller's thread
                outcome["error"] = e

        t = threading.Thread(target=run, name="settle", daemon=True)
        t.start()
        t.join(scaled(DRAIN_GRACE))
        if t.is_alive():
            n = server.release()
            log(f"exporter waits for {n} request(s) held in the block layer: released")
            t.join()  # fn's own wait is bounded
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    def cleanup(self, *args: Any, **kwargs: Any) -> list[str]:
        try:  # whatever the base class takes (how hard to stop)
            return super().cleanup(*args, **kwargs)
        finally:  # after the daemon: it may still have had requests in flight
            if self.hold_server is not None:
                self.hold_server.close()
