import sys

from ddim.cli import run

sys.exit(run())
