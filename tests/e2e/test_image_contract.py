"""The image's run-time contract without a container engine: the Dockerfile's ENTRYPOINT and ENV (parsed,
not copied), run as its USER (UID 10001, group 0) with a HOME it cannot write, against this checkout's
build of the package. Paths that point into the image are rewritten into a stand-in root: the venv to
this .venv, the model cache to a copy readable only through group 0, the /data volume to an empty
directory owned by the UID, as a freshly mounted volume is.

Run as root (as CI does) the server gets the image's UID. If this venv's interpreter lies under a
directory that UID cannot enter (pyenv under /root), the server runs in a private mount namespace in
which that directory is an empty tmpfs holding only the interpreter's tree. As another user, the test
runs the server as that (already unprivileged) user."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from server.config import default_cache_dir
from server.model.source import resolve_model
from tests.e2e.server_proc import BASE_ID, free_port
from tests.unit.test_dockerfile import REPO, ImageSpec

pytestmark = pytest.mark.e2e

SPEC = ImageSpec.parse()
IMAGE_VENV = SPEC.env()["VIRTUAL_ENV"]  # /opt/venv; stands for this checkout's .venv
# Bounded as in the rest of the e2e suite; `docker run IMAGE ARGS` would append them the same way.
SMALL = ["--kv-cache-tokens", "8192", "--max-model-len", "1024"]


def can_enter(path: Path, uid: int, gid: int) -> bool:
    st = path.stat()
    bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
    return bool(st.st_mode & bit)


@dataclass
class Container:
    """A stand-in for `docker run IMAGE ARGS`: the image's view of the filesystem under `root`."""

    root: Path
    uid: int
    gid: int
    bridged: dict[Path, set[str]]  # dirs the UID cannot enter -> children to keep reachable

    def path(self, image_path: str) -> str:
        if image_path == IMAGE_VENV or image_path.startswith(IMAGE_VENV + "/"):
            return sys.prefix + image_path[len(IMAGE_VENV) :]
        return str(self.root / image_path.lstrip("/"))

    def env(self, home: Path) -> dict[str, str]:
        """The image's ENV, paths into the image rewritten, and nothing of this process's environment."""
        env = {"HOME": str(home)}
        for key, value in SPEC.env().items():
            if key == "PATH":
                env[key] = ":".join(self.path(p) if p.startswith(IMAGE_VENV) else p for p in value.split(":"))
            else:
                env[key] = self.path(value) if value.startswith("/") else value
        return env

    def command(self, argv: list[str]) -> list[str]:
        """argv as the image's user; through a private mount namespace when the interpreter needs one."""
        if os.geteuid() != 0:
            return argv
        run_as = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--", *argv]
        if not self.bridged:
            return run_as
        script = ["set -eu"]
        for i, (blocked, children) in enumerate(self.bridged.items()):
            for j, child in enumerate(sorted(children)):
                hold = self.root / ".bridge" / f"{i}-{j}"
                hold.mkdir(parents=True, exist_ok=True)
                script.append(f"mount --bind '{blocked / child}' '{hold}'")
            script.append(f"mount -t tmpfs -o mode=0755 loraplex-test '{blocked}'")
            for j, child in enumerate(sorted(children)):
                hold = self.root / ".bridge" / f"{i}-{j}"
                script += [f"mkdir '{blocked / child}'", f"mount --move '{hold}' '{blocked / child}'"]
        script.append('exec "$@"')
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            "\n".join(script),
            "sh",
            *run_as,
        ]


def unreachable_dirs(uid: int, gid: int) -> dict[Path, set[str]]:
    """Directories on the way to the interpreter, the venv or this checkout that `uid` cannot enter."""
    needed = {Path(os.path.realpath(sys.executable)), Path(sys.base_prefix), Path(sys.prefix), REPO}
    blocked: dict[Path, set[str]] = {}
    for path in needed:
        for parent in reversed(path.resolve().parents):
            if not can_enter(parent, uid, gid):
                child = path.resolve().relative_to(parent).parts[0]
                blocked.setdefault(parent, set()).add(child)
                break
    nested = [a for a in blocked for b in blocked if a != b and b in a.parents]
    if nested:
        pytest.skip(f"{nested[0]} is unreachable for UID {uid} inside another unreachable directory")
    return blocked


@pytest.fixture
def container() -> Iterator[Container]:
    uid_s, gid_s = SPEC.user
    uid, gid = (int(uid_s), int(gid_s or 0)) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to run the server as the image's UID")
    root = Path(tempfile.mkdtemp(prefix="loraplex-image-"))
    try:
        root.chmod(0o755)
        box = Container(root, uid, gid, unreachable_dirs(uid, gid) if os.geteuid() == 0 else {})
        if box.bridged:
            probe = ["unshare", "--mount", "--propagation", "private", "true"]
            if not shutil.which("unshare") or subprocess.run(probe, capture_output=True).returncode:
                pytest.skip(f"{sorted(box.bridged)} is unreachable for UID {uid}, and no mount namespace")
        (root / "tmp").mkdir(mode=0o1777)
        (root / "tmp").chmod(0o1777)
        for volume in SPEC.volumes:  # empty, owned by the image's user, group-writable
            Path(box.path(volume)).mkdir(parents=True)
            os.chown(box.path(volume), uid, gid)
            Path(box.path(volume)).chmod(0o775)
        yield box
    finally:
        shutil.rmtree(root, ignore_errors=True)


def install_model(box: Container) -> None:
    """The converted default model where the image keeps it: owned by root, readable by group 0 only
    (what OpenShift's arbitrary UIDs share), so reading it proves the group-0 layout suffices."""
    source = resolve_model(None, default_cache_dir())[0]
    target = Path(box.path(SPEC.env()["LORAPLEX_CACHE_DIR"])) / source.relative_to(default_cache_dir())
    shutil.copytree(source, target, copy_function=shutil.copyfile)
    owner = 0 if os.geteuid() == 0 else os.getuid()
    for path in [target, *target.rglob("*")]:
        os.chown(path, owner, box.gid)
        path.chmod(0o750 if path.is_dir() else 0o640)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def test_image_entrypoint_serves_as_unprivileged_user(container: Container) -> None:
    box = container
    install_model(box)
    home = box.root / "home"  # exists, empty, and not writable by the server's UID
    home.mkdir(mode=0o555)
    env = box.env(home)
    data = Path(box.path("/data"))
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), *SMALL]  # docker run IMAGE ARGS replaces CMD
    log = box.root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(box.command([*SPEC.entrypoint, *args]), env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"not ready after 180 s:\n{tail(log)}"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=BASE_ID, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200

        # the image's own HEALTHCHECK, as the engine runs it inside the container (the port via the env)
        _, probe = SPEC.healthcheck
        probe_env = {**env, "LORAPLEX_PORT": str(port)}
        checked = subprocess.run(
            box.command(probe), env=probe_env, capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stderr

        store = Path(env["LORAPLEX_ADAPTERS_DIR"])
        assert store.is_relative_to(data) and (store / "blobs").is_dir() and (store / "staging").is_dir()
        assert store.stat().st_uid == box.uid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    output = tail(log)
    assert status == 0, f"exit status {status} on SIGTERM:\n{output}"
    assert list(home.iterdir()) == [], "the server wrote to HOME"
    assert str(home) not in output and "Permission denied" not in output, output
