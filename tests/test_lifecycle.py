"""`python app.py` managing its own vLLM: starts, prints how to log in, keeps its files private,
and leaves no process behind, whether it is stopped (SIGTERM) or killed (SIGKILL, as the OOM killer
would); a killed app starts again on the same port.

    .venv/bin/python -m pytest tests/test_lifecycle.py
"""

import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

from collector.engine import free_port
from collector.judge import Judge, JudgeConfig
from tests.conftest import ROOT


def _start(smollm2_dir: Path, data: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--model", str(smollm2_dir), "--data-dir", str(data),
         "--port", str(port), "--round-every-votes", "0"],
        cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 400
    while "Press Ctrl-C" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    return proc


def _gone(tree: list[psutil.Process], timeout: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(1)
    return alive


def test_a_killed_app_takes_its_vllm_along_and_starts_again_on_the_same_port(smollm2_dir, tmp_path):
    port = free_port()
    data = tmp_path / "data"
    proc = _start(smollm2_dir, data, port, tmp_path / "out1.txt")
    out = (tmp_path / "out1.txt").read_text()
    assert f"PrefLoop is running at http://127.0.0.1:{port}/" in out
    assert "Log in as 'admin' with password '" in out  # first run: a generated admin login
    assert (data / "users.txt").read_text().count("scrypt$") == 1
    for private in ("users.txt", "votes.db", "logs/app.log", "logs/vllm.log", "vllm-endpoint.json"):
        assert stat.S_IMODE((data / private).stat().st_mode) == 0o600, private
    tree = psutil.Process(proc.pid).children(recursive=True)
    server = next(c for c in tree if "vllm" in " ".join(c.cmdline()))
    key = server.environ()["VLLM_API_KEY"]
    assert key and key not in " ".join(server.cmdline())  # the key is not in the process list
    judge = Judge(JudgeConfig(judge_url=str(data / "vllm-endpoint.json")))  # scripts on this machine find it
    assert judge.url.startswith("http://127.0.0.1:") and judge.url.endswith("/v1")
    assert judge.headers == {"Authorization": f"Bearer {key}"}
    assert (data / "vllm.pid").read_text().split()[0] == str(server.pid)

    servers = [p for p in tree if "resource_tracker" not in " ".join(p.cmdline())]
    proc.send_signal(signal.SIGKILL)  # no handler runs: the parent-death signal must stop vLLM
    proc.wait(timeout=30)
    assert _gone(servers) == [], "vLLM outlived the killed app"

    # The next start reaps what is left of the killed run's process group (a multiprocessing
    # helper that outlives its parent), from the pid file.
    proc = _start(smollm2_dir, data, port, tmp_path / "out2.txt")
    assert f"PrefLoop is running at http://127.0.0.1:{port}/" in (tmp_path / "out2.txt").read_text()
    assert _gone(tree, timeout=5) == [], "the killed run left a process behind"
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any("vllm" in " ".join(c.cmdline()) for c in tree)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    time.sleep(2)
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [p.cmdline() for p in alive]
    assert not (data / "vllm.pid").exists()
