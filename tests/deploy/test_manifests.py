"""Offline checks of the deployment: every overlay renders (kubectl's built-in
kustomize), every object validates against the Kubernetes schema, pods pass
Pod Security "restricted", and skaffold.yaml, the Dockerfile targets and the
manifests agree with each other and with the CLI that the containers run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from autodidact.cli import _parser
from autodidact.stack import DEFAULT_PORTS, IMPLEMENTED

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("local-cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"
MODEL_SERVERS = ("tgi", "tei")


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: `make test` installs it (apt-get install kubectl)")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)], check=True, capture_output=True, text=True
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def dockerfile_targets() -> dict[str, list[str]]:
    """Final stage name -> its ENTRYPOINT."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    targets: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        if match := re.match(r"FROM \S+ AS (\S+)", line):
            current = match.group(1)
            targets[current] = []
        elif line.startswith("ENTRYPOINT") and current:
            targets[current] = json.loads(line.removeprefix("ENTRYPOINT").strip())
    return targets


def skaffold() -> dict:
    return yaml.safe_load((ROOT / "skaffold.yaml").read_text())


def deployments(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}


def test_every_object_validates_against_the_kubernetes_schema(rendered):
    _, objects = rendered
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_implemented_service_has_its_objects(rendered):
    overlay, objects = rendered
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for service in IMPLEMENTED:
        for kind in ("ServiceAccount", "Deployment", "Service", "PodDisruptionBudget"):
            assert (kind, service) in kinds, f"{overlay}: {service} lacks a {kind}"
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for balanced_by_clients in ("generator", "dedup"):
        assert services[balanced_by_clients]["spec"]["clusterIP"] == "None"
    assert ("HorizontalPodAutoscaler", "generator") in kinds
    assert ("NetworkPolicy", "default-deny") in kinds


def test_pods_pass_pod_security_restricted(rendered):
    _, objects = rendered
    for name, deployment in deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert all("hostPath" not in volume for volume in pod.get("volumes", [])), name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and not security.get("privileged"), name
            assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add"), name
            assert security["readOnlyRootFilesystem"] is True, name


def test_containers_have_requests_limits_and_probes(rendered):
    overlay, objects = rendered
    for name, deployment in deployments(objects).items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{overlay}/{name}: {bound}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{overlay}/{name}: {probe}"
            if name in IMPLEMENTED:  # native gRPC health probes on the service's own port
                assert container["readinessProbe"]["grpc"]["port"] == DEFAULT_PORTS[name]
                assert container["livenessProbe"]["grpc"]["port"] == DEFAULT_PORTS[name]


def test_gpu_overlay_puts_model_servers_on_gpu_nodes():
    objects = deployments(render("gpu"))
    for server in MODEL_SERVERS:
        pod = objects[server]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
        assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 1200
    assert "--enable-prefill-logprobs" in objects["tgi"]["spec"]["template"]["spec"]["containers"][0]["args"]
    local = deployments(render("local-cpu"))
    assert not set(MODEL_SERVERS) & set(local)


def test_skaffold_names_only_targets_overlays_and_images_that_exist():
    config = skaffold()
    assert config["apiVersion"] == "skaffold/v4beta13"
    targets = dockerfile_targets()
    sections = [config] + config["profiles"]
    assert {p["name"] for p in config["profiles"]} == set(OVERLAYS)
    for section in sections:
        paths = section["manifests"]["kustomize"]["paths"]
        for path in paths:
            assert (ROOT / path / "kustomization.yaml").is_file(), path
        built = {a["image"]: a["docker"]["target"] for a in section["build"]["artifacts"]}
        for artifact in section["build"]["artifacts"]:
            assert (ROOT / artifact["docker"]["dockerfile"]).is_file()
            assert artifact["docker"]["target"] in targets, artifact
        # Every autodidact image the overlay runs is built, and nothing else is.
        used = {
            c["image"]
            for path in paths
            for d in deployments(render(Path(path).name)).values()
            for c in d["spec"]["template"]["spec"]["containers"]
            if c["image"].startswith("autodidact/")
        }
        assert used == set(built), (section.get("name", "default"), used, set(built))


def test_every_container_command_starts_its_service_with_flags_the_cli_accepts():
    targets = dockerfile_targets()
    for profile in skaffold()["profiles"]:
        built = {a["image"]: a["docker"]["target"] for a in profile["build"]["artifacts"]}
        for name, deployment in deployments(render(profile["name"])).items():
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            if not container["image"].startswith("autodidact/"):
                continue
            entrypoint = targets[built[container["image"]]]
            assert entrypoint == ["autodidact", "serve", name], (profile["name"], name, entrypoint)
            args = _parser().parse_args(entrypoint[1:] + container.get("args", []))  # exits on an unknown flag
            assert args.service == name and args.port == DEFAULT_PORTS[name]


def test_each_image_carries_the_backend_its_overlay_selects():
    """The slim images go with remote backends, the embedded ones with embedded models."""
    expected = {
        ("generator", "llamacpp"): "generator-llamacpp",
        ("generator", "tgi"): "generator",
        ("dedup", "local"): "dedup-minilm",
        ("dedup", "tei"): "dedup",
        ("scorer", "llamacpp"): "scorer-llamacpp",
        ("scorer", "tgi"): "scorer",
    }
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert '"/src[llamacpp]"' in dockerfile.split("AS venv-generator-llamacpp")[1].split("FROM")[0]
    assert "minilm" in dockerfile.split("AS venv-dedup-minilm")[1].split("FROM")[0]
    for slim in ("venv-generator", "venv-dedup"):
        stage = dockerfile.split(f"AS {slim}\n")[1].split("FROM")[0]
        assert "llamacpp" not in stage and "torch" not in stage and "minilm" not in stage, slim
    for profile in skaffold()["profiles"]:
        built = {a["image"]: a["docker"]["target"] for a in profile["build"]["artifacts"]}
        for name, deployment in deployments(render(profile["name"])).items():
            if name not in ("generator", "scorer", "dedup"):
                continue
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            backend = env["AUTODIDACT_EMBEDDER"] if name == "dedup" else env["AUTODIDACT_LLM_BACKEND"]
            assert built[container["image"]] == expected[(name, backend)], (profile["name"], name, backend)
