"""Start the real `loraplex serve` as a subprocess on a free port, and stop it."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.integrations.engine_proc import wait_until_ready

BASE_ID = "SmolLM2-135M-Instruct"
ADMIN_KEY = "admin-key-for-tests"
API_KEY = "inference-key-for-tests"

# Each pytest-xdist worker (gw0, gw1, ...) draws ports from a block of its own, below Linux's
# ephemeral range (32768-60999): a port picked here stays free for the 10-20 s until its server
# binds it, as neither another worker's bind(0) nor a client's outgoing connection can take it.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or "0")
_PORTS = itertools.count(20000 + 1000 * _WORKER)


def free_port() -> int:
    """The next port of this worker's block that nothing is bound to (one held over from an earlier
    run is skipped)."""
    while True:
        port = next(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@dataclass
class ServerProc:
    store: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None  # the server's stdout and stderr are appended here when set

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProc:
        cmd = [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--port",
            str(self.port),
            "--adapters-dir",
            str(self.store),
            "--kv-cache-tokens",
            "8192",
            "--max-model-len",
            "1024",
            "--log-level",
            "warning",
            *self.args,
        ]
        if self.log is None:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env})
        else:
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=out, stderr=out)
        wait_until_ready(self.url, self.proc, 300, self._log_tail)
        return self

    def _log_tail(self, lines: int = 30) -> str:
        if self.log is None:
            return ""  # the server wrote to this process's own output
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServerProc:
        try:
            return self.start()
        except BaseException:
            self.stop(check=False)
            raise

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.stop(check=exc_type is None)  # a failing test's own error is the one to see

    def stop(self, check: bool = True) -> None:
        """SIGTERM, as an orchestrator sends it: the server must shut down cleanly, exit status 0."""
        if self.proc is not None:
            proc, self.proc = self.proc, None
            proc.terminate()
            status = proc.wait(timeout=60)
            assert status == 0 or not check, f"the server exited with {status} on SIGTERM"


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def upload(
    url: str,
    name: str,
    directory: Path,
    key: str | None = ADMIN_KEY,
    files: dict[str, tuple[str, bytes]] | None = None,
) -> httpx.Response:
    """POST /v1/adapters with the two files of `directory` (or the given parts)."""
    parts = (
        files
        if files is not None
        else {
            f: (f, (directory / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")
        }
    )
    return httpx.post(
        f"{url}/v1/adapters", data={"name": name}, files=parts, headers=headers(key), timeout=120
    )


def chat(url: str, model: str, key: str | None = API_KEY) -> httpx.Response:
    """A one-token greedy chat on `model`: is it served, to this key?"""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "temperature": 0,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers(key), timeout=300)
