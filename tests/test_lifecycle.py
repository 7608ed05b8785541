"""`python app.py` managing its own vLLM: starts, prints how to log in, and SIGTERM leaves no
process behind.

    .venv/bin/python -m pytest tests/test_lifecycle.py
"""

import signal
import subprocess
import sys
import time

import psutil

from collector.engine import free_port
from tests.conftest import ROOT


def test_sigterm_stops_the_app_and_its_vllm_server(smollm2_dir, tmp_path):
    port = free_port()
    log = tmp_path / "out.txt"
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--model", str(smollm2_dir), "--data-dir", str(tmp_path / "data"),
         "--port", str(port), "--round-every-votes", "0"],
        cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 400
    while "Press Ctrl-C" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    out = log.read_text()
    assert f"PrefLoop is running at http://127.0.0.1:{port}/" in out
    assert "Log in as 'admin' with password '" in out  # first run: a generated admin login
    assert (tmp_path / "data" / "users.txt").read_text().count("scrypt$") == 1
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any("vllm" in " ".join(c.cmdline()) for c in tree)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    time.sleep(2)
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [p.cmdline() for p in alive]
