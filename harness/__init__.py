"""fuse-uring-iotests: a conformance harness for FUSE block exports."""

__version__ = "0.1.0"
