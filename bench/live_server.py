"""The real `loraplex serve` as a subprocess for the HTTP benchmarks: started on a free port with its
log in a file, watched through /proc (RSS), stopped with SIGTERM as an orchestrator stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from server.integrations.engine_proc import free_port, wait_until_ready


@dataclass
class LiveServer:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident set size now (VmRSS of /proc/<pid>/status), 0 once the process is gone."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
        except OSError:
            pass
        return 0

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM (the graceful drain), then the exit status; SIGKILL if it outlives `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -signal.SIGKILL


def start(
    args: list[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    threads: int | None = None,
    timeout: float = 600,
) -> LiveServer:
    """`python -m server serve ARGS` on a free port, returned once /ready answers 200. Settings from
    the caller's environment (LORAPLEX_*, keys above all) are dropped, except the cache dir: the run
    is configured by `args` and `env` alone."""
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--log-level", "warning", *args]
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_") or k == "LORAPLEX_CACHE_DIR"
    }
    full_env.update(env or {})
    if threads:
        full_env["OMP_NUM_THREADS"] = full_env["MKL_NUM_THREADS"] = str(threads)
    log = workdir / "server.log"
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_until_ready(server.url, proc, timeout, server.log_tail)
    except BaseException:
        server.stop()
        raise
    return server
