"""The reference FUSE block exporter (python -m harness.exporter).

Sans-IO request handling (protocol), the image behind it (backend), the two
transports that move bytes between the kernel and the handler (transport,
uring_transport), fault injection and the QMP control socket.  Imports
harness.kernel and the shared modules, never the runner (harness.iotests).
"""
