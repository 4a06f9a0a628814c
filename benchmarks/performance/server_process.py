"""
`trl-micro serve` in a subprocess on 127.0.0.1, for the serving benchmarks (`serving`, `serving_soak`, `user_store`):
start it and wait for `/health`, stop or kill it, post JSON to it, and the untrained MiCRo checkpoint it serves.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from transformers import AutoTokenizer

from trl_micro import MiCRoRewardModel

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_SECONDS, REQUEST_SECONDS = 300, 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=REQUEST_SECONDS) as response:
        return json.loads(response.read().decode())


class Server:
    """`trl-micro serve` in a subprocess on 127.0.0.1 (stopped by `stop`, killed by `kill`)."""

    def __init__(self, *arguments: str, port: int | None = None, log: Path | None = None, threads: int = 1):
        self.port = port or free_port()
        self.arguments, self.log, self.threads = arguments, log, threads
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        command = [sys.executable, "-m", "trl_micro.scripts.cli", "serve", *self.arguments, "--port", str(self.port)]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        output = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"trl-micro serve exited with {self.process.returncode}: {shlex.join(command)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"trl-micro serve did not answer /health within {STARTUP_SECONDS} s")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def save_untrained_checkpoint(model_path: str, folder: Path) -> str:
    model = MiCRoRewardModel.from_backbone(model_path, num_heads=4)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(folder)
    return str(folder)
