"""`ddim serve` is an optional extra: the CLI and the library work without flask and waitress."""

from __future__ import annotations

import subprocess
import sys


def test_cli_and_library_do_not_import_the_web_framework():
    code = (
        "import sys, ddim, ddim.cli, ddim.edit; bad = {'flask', 'waitress', 'werkzeug'} & set(sys.modules); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()", out.stdout + out.stderr


def test_serve_without_the_extra_says_what_to_install():
    # flask made unimportable: `ddim serve` names the extra, exit 1, one line
    code = "import sys; sys.modules['flask'] = None; from ddim.cli import run; sys.exit(run(['serve', '--port', '0']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "pip install 'ddim[serve]'" in out.stderr
