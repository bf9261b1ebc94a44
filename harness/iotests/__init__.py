"""The test runner: case model, steps, targets, runner, check, golden files,
filters and reports.  Drives exporters as processes (the reference exporter,
qemu-storage-daemon); never imports the exporter's code (harness.exporter).
"""
