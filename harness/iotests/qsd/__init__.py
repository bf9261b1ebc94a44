"""qemu-storage-daemon builds for the qsd targets: upstream binaries fetched
from Debian (fetch.py) and QEMU built from source with a patch stack
(build.py), bisected over that stack (bisect.py), and QEMU's own
qemu-iotests run in the built tree (iotests.py).  `tools/qsd` is the CLI."""
