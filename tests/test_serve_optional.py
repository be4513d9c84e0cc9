"""`ddim serve` is an optional extra: the CLI and the library work without flask and waitress."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import ddim, ddim.cli, ddim.edit
print(sorted({'flask', 'waitress', 'werkzeug'} & set(sys.modules)))
sys.modules['flask'] = None  # as if the extra were not installed
from ddim.cli import run
sys.exit(run(['serve', '--port', '0']))
"""


def test_cli_and_library_work_without_the_extra_and_serve_names_it():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr  # importing ddim and its CLI loads no web framework
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "pip install 'ddim[serve]'" in out.stderr
