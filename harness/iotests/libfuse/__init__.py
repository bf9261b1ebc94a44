"""libfuse 3.18 with FUSE-over-io_uring, built from Debian's source packages,
and the block export server on it (blkexport.c); see docs/libfuse.md."""
