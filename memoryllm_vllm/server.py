"""
`ServerProcess`: `vllm serve` with the memory connector in a child process (for tests, benchmarks and scripts).

    with ServerProcess("reading-model", "store", port=8000) as server:
        reply = server.chat("alice", [{"role": "user", "content": "Who built the lighthouse?"}], max_tokens=32)
"""

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from transformers.utils import logging

from .cli import chat_request, post_json, serve_command
from .store import MemoryStore


logger = logging.get_logger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A `vllm serve` of the reading model in `export` reading memories from `store`; `extra` are more options."""

    def __init__(self, export, store, port: int | None = None, extra: list[str] = (), log_path=None):
        self.export, self.store = os.fspath(export), MemoryStore(store)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = serve_command(self.export, os.fspath(store), ["--port", str(self.port), *extra])
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 900) -> "ServerProcess":
        self._log = open(self.log_path, "w") if self.log_path else None  # closed by `stop`
        output = self._log or subprocess.DEVNULL
        self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with status {self.process.returncode} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        self.stop()
        raise TimeoutError(f"vllm serve did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """Stop the server and its engine processes (its own process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def chat(self, memory: str | None, messages: list[dict], **options) -> dict:
        """A chat completion reading `memory` (its current version; `None`: no memory)."""
        body = chat_request(self.store, memory, messages, model=self.export, **options)
        return post_json(f"{self.url}/v1/chat/completions", body)

    def post(self, path: str, body: dict) -> dict:
        return post_json(f"{self.url}{path}", {"model": self.export, **body})

    def status_of(self, path: str, body: dict) -> int:
        """The HTTP status of a request (for requests that must fail)."""
        try:
            self.post(path, body)
        except urllib.error.HTTPError as error:
            return error.code
        return 200


__all__ = ["ServerProcess", "free_port"]
