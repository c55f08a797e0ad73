"""A CLI run in a child process, signalled once it has reached a step (the tests of interruptions use it)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def signal_at_marker(
    cmd: list[str], env: dict[str, str], marker: Path, sig: int = signal.SIGTERM, timeout: float = 120
) -> tuple[int, str]:
    """Start ``cmd``, wait until it writes ``marker`` (``toy.MarkStep``), send it ``sig`` and wait for it to end.

    Returns:
        its exit status and its output (stdout and stderr together).
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=5)[0][-3000:] if proc.poll() is not None else "no marker"
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output
