"""The Ray Serve app's deploy configs (deploy/ray/), its builder's arguments and the `ray-serve`
command, without starting Ray (the app itself: tests/e2e/test_ray_serve.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.integrations.ray_args import RayServeArgs

REPO = Path(__file__).resolve().parents[2]


def test_deploy_configs_agree() -> None:
    pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    from server.integrations.ray_serve import build_app

    config = yaml.safe_load((REPO / "deploy/ray/serve_config.yaml").read_text())
    docs = list(yaml.safe_load_all((REPO / "deploy/ray/rayservice.yaml").read_text()))
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert svc["apiVersion"] == "ray.io/v1"
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == config
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "server.integrations.ray_serve:build_app"
    build_app(application["args"])
    args = RayServeArgs.model_validate(application["args"])
    assert args.adapters_dir is not None and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = svc["spec"]["rayClusterConfig"]
    groups = cluster["workerGroupSpecs"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    for pod in pods:  # every pod mounts the shared store where the app's args say it is
        vols = {
            v["name"]
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        }
        (container,) = pod["containers"]
        assert container["image"] == "loraplex:latest"
        mounts = [m["mountPath"].rstrip("/") + "/" for m in container["volumeMounts"] if m["name"] in vols]
        assert any(args.adapters_dir.startswith(m) for m in mounts), (mounts, args.adapters_dir)
        assert {"name": "serve", "containerPort": config["http_options"]["port"]} in container["ports"]
    gpus = sum(
        g["maxReplicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for g in groups
    )
    assert args.num_gpus > 0 and gpus >= args.replicas * args.num_gpus


def test_build_app_args() -> None:
    a = RayServeArgs.model_validate(
        {"replicas": "2", "serve_args": "--device cpu --no-cuda-graphs", "max_num_seqs": "4"}
    )
    assert a.replicas == 2 and a.replica_max_ongoing == 256  # the child's in-flight limit
    assert a.child_args() == [
        "--device",
        "cpu",
        "--no-cuda-graphs",
        "--max-loras",
        "8",
        "--max-num-seqs",
        "4",
        "--max-queue",
        "256",
    ]
    with pytest.raises(ValueError, match="args of their own"):
        RayServeArgs.model_validate({"serve_args": ["--port=9000"]})
    with pytest.raises(ValueError, match="max_num_seqs"):
        RayServeArgs.model_validate({"max_num_seqs": 32, "max_ongoing_requests": 5})  # Serve's default


def test_ray_serve_command_passes_serve_flags_to_the_children(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    from server import cli
    from server.integrations import ray_serve

    calls: list[tuple[Any, ...]] = []

    def run_local(*a: Any) -> int:
        calls.append(a)
        return 0

    monkeypatch.setattr(ray_serve, "run_local", run_local)
    argv = ["ray-serve", "--replicas", "3", "--device", "cpu", "--batch-invariant", "--port", "9001"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b c").mkdir()
    modules = [
        "--lora-modules",
        f"a={tmp_path / 'a'}",
        json.dumps({"name": "b", "path": str(tmp_path / "b c")}),
    ]
    argv += modules
    assert (
        cli.main([*argv, "--max-loras", "4", "--adapters-dir", "/srv/store", "--log-level", "warning"]) == 0
    )
    ((args, host, port, _),) = calls
    assert (host, port) == ("127.0.0.1", 9001)
    cfg = RayServeArgs.model_validate(args)
    assert (cfg.replicas, cfg.max_loras, cfg.adapters_dir, cfg.num_gpus) == (3, 4, "/srv/store", 0)
    # one argument per entry: a space inside a path survives
    assert cfg.serve_args == ["--device", "cpu", *modules, "--batch-invariant", "--log-level", "warning"]
    calls.clear()  # a module that cannot be found stops ray-serve before Ray starts
    assert cli.main(["ray-serve", "--lora-modules", f"x={tmp_path / 'absent'}"]) == 2 and not calls


def test_a_replica_calls_its_child_with_a_key_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keys document may hold digests only: the replica adds a random inference key of its own to
    the child's environment instead of needing a plain one in LORAPLEX_API_KEYS."""
    import hashlib
    import json

    from server.api.auth import KeyRing
    from server.config import Settings
    from server.integrations.engine_proc import KEY_VARS, with_internal_key

    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    assert with_internal_key({"PATH": "/bin"}) == ({"PATH": "/bin"}, None)  # open server: no key
    digest = hashlib.sha256(b"tenant-secret-0123456789").hexdigest()
    doc = json.dumps({"keys": [{"name": "t", "sha256": digest, "adapters": ["team/*"]}]})
    env, key = with_internal_key({"LORAPLEX_KEYS": doc})
    assert key is not None and env["LORAPLEX_API_KEYS"] == key and env["LORAPLEX_KEYS"] == doc
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ring = KeyRing.from_settings(Settings.model_validate({}))
    granted = ring.grant_of(key)
    assert granted is not None and granted.role == "inference" and granted.patterns is None
    assert ring.grant_of("tenant-secret-0123456789") is not None  # the tenant's key still works
    env, again = with_internal_key({"LORAPLEX_API_KEYS": "user-key-0123456789"})
    assert again != key and env["LORAPLEX_API_KEYS"] == f"user-key-0123456789,{again}"
