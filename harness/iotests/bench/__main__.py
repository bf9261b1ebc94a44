from ...cli import run_tool
from .main import main

run_tool(main)
