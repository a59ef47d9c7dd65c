"""A real `finetune serve` subprocess for the HTTP tests: start on a free port, wait for /health, stop, read its log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

BLOCK_TORCH = (
    "import sys\n"
    "for name in ('torch', 'transformers', 'accelerate'):\n"
    "    sys.modules[name] = None  # any import of these now raises ImportError\n"
    "from finetune.cli import main\n"
    "main()\n"
)


class ServerProcess:
    """`finetune serve ARGS --port 0`, its URL read from the startup banner."""

    def __init__(self, *args: str, block_torch: bool = False, env: dict | None = None, timeout: float = 120):
        code = BLOCK_TORCH if block_torch else "from finetune.cli import main; main()"
        command = [sys.executable, "-c", code, "serve", *map(str, args), "--port", "0"]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        self.lines: list[str] = []
        self._url = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        if not self._url.wait(timeout):
            self.stop()
            raise AssertionError("the server printed no URL:\n" + self.log)
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError("the server did not become healthy:\n" + self.log)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            match = re.search(r"at (http://[\d.]+:\d+)/v1", line)
            if match and not self.url:
                self.url = match.group(1)
                self._url.set()

    def rss_mb(self) -> float:
        """The server process's resident memory now (Linux /proc)."""
        with open(f"/proc/{self.process.pid}/status") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        return kib / 1024

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
