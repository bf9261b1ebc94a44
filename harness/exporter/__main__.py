import sys

from ..cli import run_tool
from .export import main

if sys.argv[1:] == ["--spare"]:
    # A warm spare (harness/iotests/targets/reference.py): everything is
    # imported; wait for the real command line on stdin, one JSON line.
    from .export import serve_spare

    sys.exit(serve_spare(sys.stdin.buffer))
run_tool(main)
