"""Command-line plumbing shared by the exporter and tools/check."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and status 1, like every other bad input.
        self.exit(1, f"{self.prog}: {message}\n")
