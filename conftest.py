"""pytest entry point; the fixtures live in harness/fixtures.py."""

pytest_plugins = ["harness.fixtures"]
