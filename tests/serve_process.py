"""Starting and stopping a real ``ddim serve`` process for the tests (not a test module)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(*args: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python -m ddim serve --port 0 ...`` in a subprocess; returns it and its URL once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddim", "serve", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"ddim serve did not start: {''.join(lines)}")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """Ctrl-C (SIGINT) the server; returns its remaining stderr. Fails unless it exits 0 in time."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    assert proc.returncode == 0, err
    return err
