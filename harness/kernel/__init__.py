"""The kernel's side: FUSE ABI structs, the io_uring ring, mount(2), kernel
parameters and errno names.  Shared by the reference exporter and the test
runner; imports nothing else from harness."""
