"""Offline checks of the deployment: every overlay renders (kubectl's built-in
kustomize), every object validates against the Kubernetes schema, pods pass
Pod Security "restricted", and skaffold.yaml, the Dockerfile targets and the
manifests agree with each other and with the CLI that the containers run.

The authentication wiring too: every service is served with an auth
configuration (never --insecure), every file a flag names is in a volume
mounted there (the auth file, the JWKS, the tenants file, the projected
identity token whose audience is the one the services accept, TLS files),
the auth and tenants files parse as the services parse them, every service
that calls another carries its own identity, and the auth file gives those
identities the service role.

The dedup shards too: the dedup StatefulSet runs as many pods as the
coordinator's --dedup-target names shards, pod i is the i-th address and
serves --shard i/N, i from its pod-index label. And the `ha` overlay: several
coordinators on a PostgreSQL DSN from the CloudNativePG Cluster's Secret, a
ReadWriteMany data volume, disruption budgets and anti-affinity."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from autodidact.cli import _auth_settings, _parser
from autodidact.coordinator.tenants import Tenants
from autodidact.runtime.auth import AuthFile
from autodidact.runtime.principal import SERVICE
from autodidact.stack import CALLS, DEFAULT_PORTS, IMPLEMENTED

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("local-cpu", "gpu", "ha")
KUBERNETES_VERSION = "1.32.0"
MODEL_SERVERS = ("tgi", "tei")


K8S = ROOT / "deploy" / "k8s"
COMPONENTS = ("tls", "mutual-tls")
# Secrets the operator creates (docs/deploy.md), and the keys the manifests expect in them.
OPERATOR_SECRETS = {
    "autodidact-jwks": {"jwks.json"},
    "coordinator-tls": {"tls.crt", "tls.key"},
    "coordinator-client-ca": {"ca.crt"},
}
# Custom resources kubernetes-validate has no schema for: checked structurally on their own.
CUSTOM_API_GROUPS = ("postgresql.cnpg.io/",)
# The label the StatefulSet controller gives each pod: its ordinal (Kubernetes 1.28 and newer).
POD_INDEX_FIELD = "metadata.labels['apps.kubernetes.io/pod-index']"
# Flags that name a file the container must find in a mounted volume.
FILE_FLAGS = ("auth_file", "jwks_file", "token_file", "tenants_file", "tls_cert", "tls_key", "tls_client_ca", "tls_ca")


def kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: `make test` installs it (apt-get install kubectl)")
    out = subprocess.run([kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def render(overlay: str) -> list[dict]:
    return kustomize(K8S / "overlays" / overlay)


def render_with_components(directory: Path, overlay: str, components: tuple[str, ...]) -> list[dict]:
    """An overlay with components added, as a platform team's own overlay would add them
    (kustomize takes relative paths only)."""
    base = Path(os.path.relpath(K8S, directory))
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(base / "overlays" / overlay)],
                "components": [str(base / "components" / name) for name in components],
            }
        )
    )
    return kustomize(directory)


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


def workloads(objects: list[dict]) -> dict[str, dict]:
    """Name -> Deployment or StatefulSet: whatever runs pods."""
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "StatefulSet")}


def pod_index_variables(container: dict) -> set[str]:
    """The container's environment variables that hold its pod's StatefulSet ordinal."""
    return {e["name"] for e in container.get("env", []) if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == POD_INDEX_FIELD}


def pod_args(container: dict, index: int = 0) -> list[str]:
    """The container's args as the pod with ordinal `index` gets them: $(VAR) of a
    pod-index variable replaced as the kubelet does (others are left to expand())."""
    names = pod_index_variables(container)

    def lookup(match: re.Match) -> str:
        return str(index) if match.group(1) in names else match.group(0)

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lookup, arg) for arg in container.get("args", [])]


def test_every_object_validates_against_the_kubernetes_schema(rendered):
    _, objects = rendered
    for obj in objects:
        if obj["apiVersion"].startswith(CUSTOM_API_GROUPS):
            continue  # no schema without the CRD: test_ha_postgres_cluster_is_the_one_the_coordinators_read
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_implemented_service_has_its_objects(rendered):
    overlay, objects = rendered
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for service in IMPLEMENTED:
        for kind in ("ServiceAccount", "Service", "PodDisruptionBudget"):
            assert (kind, service) in kinds, f"{overlay}: {service} lacks a {kind}"
        # dedup keeps a volume per pod: a StatefulSet; the others are Deployments.
        workload = "StatefulSet" if service == "dedup" else "Deployment"
        assert (workload, service) in kinds, f"{overlay}: {service} lacks a {workload}"
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for balanced_by_clients in ("generator", "dedup"):
        assert services[balanced_by_clients]["spec"]["clusterIP"] == "None"
    assert ("HorizontalPodAutoscaler", "generator") in kinds
    assert ("NetworkPolicy", "default-deny") in kinds


def test_pods_pass_pod_security_restricted(rendered):
    _, objects = rendered
    for name, workload in workloads(objects).items():
        pod = workload["spec"]["template"]["spec"]
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
    for name, workload in workloads(objects).items():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{overlay}/{name}: {bound}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{overlay}/{name}: {probe}"
            if name in IMPLEMENTED:  # native gRPC health probes on the service's own port
                assert container["readinessProbe"]["grpc"]["port"] == DEFAULT_PORTS[name]
                assert container["livenessProbe"]["grpc"]["port"] == DEFAULT_PORTS[name]


def test_gpu_overlay_puts_model_servers_on_gpu_nodes():
    objects = workloads(render("gpu"))
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
    local = workloads(render("local-cpu"))
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
            for d in workloads(render(Path(path).name)).values()
            for c in d["spec"]["template"]["spec"]["containers"]
            if c["image"].startswith("autodidact/")
        }
        assert used == set(built), (section.get("name", "default"), used, set(built))


def test_every_container_command_starts_its_service_with_flags_the_cli_accepts():
    targets = dockerfile_targets()
    for profile in skaffold()["profiles"]:
        built = {a["image"]: a["docker"]["target"] for a in profile["build"]["artifacts"]}
        for name, workload in workloads(render(profile["name"])).items():
            container = workload["spec"]["template"]["spec"]["containers"][0]
            if not container["image"].startswith("autodidact/"):
                continue
            entrypoint = targets[built[container["image"]]]
            assert entrypoint == ["autodidact", "serve", name], (profile["name"], name, entrypoint)
            args = _parser().parse_args(entrypoint[1:] + pod_args(container))  # exits on an unknown flag
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
        for name, workload in workloads(render(profile["name"])).items():
            if name not in ("generator", "scorer", "dedup"):
                continue
            container = workload["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            backend = env["AUTODIDACT_EMBEDDER"] if name == "dedup" else env["AUTODIDACT_LLM_BACKEND"]
            assert built[container["image"]] == expected[(name, backend)], (profile["name"], name, backend)


# --- authentication, identity, tenants and object stores ---


def autodidact_containers(objects: list[dict]) -> dict[str, tuple[dict, dict]]:
    """Service name -> (pod spec, its autodidact container)."""
    found = {}
    for name, workload in workloads(objects).items():
        pod = workload["spec"]["template"]["spec"]
        container = pod["containers"][0]
        if container["image"].startswith("autodidact/"):
            found[name] = (pod, container)
    return found


def parsed(name: str, container: dict, index: int = 0):
    """The container's command line as `serve` parses it (in the pod with ordinal `index`)."""
    return _parser().parse_args(["serve", name, *pod_args(container, index)])


def configmap(objects: list[dict], name: str) -> dict:
    return next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)


def secret_data(objects: list[dict], name: str) -> dict[str, str] | None:
    """A Secret the manifests generate (decoded), or None for one the operator creates."""
    for o in objects:
        if o["kind"] == "Secret" and o["metadata"]["name"] == name:
            return {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()} | dict(o.get("stringData", {}))
    return None


def expand(value: str, container: dict, objects: list[dict]) -> str:
    """`value` with $(VAR) replaced as the kubelet does, from env entries with a value or a ConfigMap key."""

    def lookup(match: re.Match) -> str:
        entry = next((e for e in container.get("env", []) if e["name"] == match.group(1)), None)
        assert entry is not None, f"{match.group(0)} in the args has no env entry (the kubelet would pass it literally)"
        if "value" in entry:
            return entry["value"]
        ref = entry["valueFrom"]["configMapKeyRef"]
        return configmap(objects, ref["name"])["data"][ref["key"]]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lookup, value)


def files_in_volume(volume: dict, objects: list[dict]) -> dict[str, dict]:
    """File name -> what provides it, for a volume mounted without subPath."""
    if "secret" in volume:
        name = volume["secret"]["secretName"]
        data = secret_data(objects, name)
        keys = set(data) if data is not None else OPERATOR_SECRETS[name]
        return {key: {"secret": name} for key in keys}
    if "configMap" in volume:
        name = volume["configMap"]["name"]
        return {key: {"configMap": name} for key in configmap(objects, name)["data"]}
    if "projected" in volume:
        return {
            source["serviceAccountToken"]["path"]: source["serviceAccountToken"]
            for source in volume["projected"]["sources"]
            if "serviceAccountToken" in source
        }
    return {}


def mounted_file(pod: dict, container: dict, path: str, objects: list[dict]) -> dict:
    """What provides the file at `path` in the container; fails when no volume mounted there has it."""
    for mount in container.get("volumeMounts", []):
        relative = PurePosixPath(path).relative_to(mount["mountPath"]) if path.startswith(mount["mountPath"] + "/") else None
        if relative is None:
            continue
        assert "subPath" not in mount, f"{path}: a subPath mount is never updated when its Secret rotates"
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        files = files_in_volume(volume, objects)
        assert str(relative) in files, f"{path}: volume {mount['name']} holds {sorted(files)}"
        return files[str(relative)]
    raise AssertionError(f"{path}: no volume is mounted there")


def check_auth_wiring(objects: list[dict], where: str) -> None:
    audience = configmap_value(objects, "JWT_AUDIENCE")
    for name, (pod, container) in autodidact_containers(objects).items():
        at = f"{where}/{name}"
        args = parsed(name, container)
        assert not args.insecure and "--insecure" not in container.get("args", []), at
        assert all(e["name"] != "AUTODIDACT_INSECURE" for e in container.get("env", [])), at
        settings = _auth_settings(args)  # raises on a combination that cannot work
        assert settings.configured and settings.auth_file is not None and settings.verifies_jwts, at
        assert expand(args.jwt_audience, container, objects) == audience, at
        assert expand(args.jwt_issuer, container, objects).startswith("https://"), at
        for flag in FILE_FLAGS:
            value = getattr(args, flag, None)
            if value is not None:
                mounted_file(pod, container, str(value), objects)
        # Its own identity exactly when it calls other services: a projected token for the audience they accept.
        if CALLS[name]:
            assert args.token_file is not None, f"{at}: calls {CALLS[name]} without an identity (--token-file)"
            token = mounted_file(pod, container, str(args.token_file), objects)
            assert token.get("audience") == audience, f"{at}: its token's audience is not the services' ({audience})"
            assert 600 <= token.get("expirationSeconds", 3600) <= 86400, at
        else:
            assert args.token_file is None, f"{at} calls no service: it needs no token"
        for neighbour in CALLS[name]:
            target = getattr(args, f"{neighbour.replace('-', '_')}_target")
            if neighbour == "dedup" and "," in target:  # sharded: every pod of the StatefulSet, in order
                shards = target.split(",")
                expected = ",".join(f"dns:///dedup-{i}.dedup:{DEFAULT_PORTS['dedup']}" for i in range(len(shards)))
                assert target == expected, f"{at}: --dedup-target is {target}"
                continue
            assert target == f"dns:///{neighbour}:{DEFAULT_PORTS[neighbour]}", f"{at}: --{neighbour}-target is {target}"


def configmap_value(objects: list[dict], key: str) -> str:
    return next(o["data"][key] for o in objects if o["kind"] == "ConfigMap" and key in o.get("data", {}))


def test_every_service_authenticates_its_callers_with_files_mounted_where_its_flags_point(rendered):
    overlay, objects = rendered
    check_auth_wiring(objects, overlay)


def test_the_auth_file_gives_every_calling_service_the_service_role(rendered, tmp_path):
    overlay, objects = rendered
    generated = secret_data(objects, "autodidact-auth-file")
    assert generated is not None, f"{overlay}: the manifests generate no auth file"
    auth = AuthFile.parse(generated["auth.yaml"], "auth.yaml")
    for name, (pod, _) in autodidact_containers(objects).items():
        if not CALLS[name]:
            continue
        namespace = workloads(objects)[name]["metadata"]["namespace"]
        subject = f"system:serviceaccount:{namespace}:{pod['serviceAccountName']}"
        assert subject in auth.subjects, f"{overlay}: the auth file does not know {subject}"
        assert SERVICE in auth.subjects[subject][1], subject
    # The tenants file parses as the coordinator parses it, where the coordinator reads it.
    pod, container = autodidact_containers(objects)["coordinator"]
    source = mounted_file(pod, container, str(parsed("coordinator", container).tenants_file), objects)
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(configmap(objects, source["configMap"])["data"]["tenants.yaml"])
    Tenants.load(tenants)


def test_the_namespace_enforces_pod_security_restricted(rendered):
    overlay, objects = rendered
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    assert len(namespaces) == 1, overlay
    assert namespaces[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {namespaces[0]["metadata"]["name"]}


def test_object_store_settings_reach_the_coordinator_as_variables_the_cli_reads(rendered, monkeypatch):
    overlay, objects = rendered
    _, container = autodidact_containers(objects)["coordinator"]
    refs = [source["configMapRef"]["name"] for source in container.get("envFrom", []) if "configMapRef" in source]
    assert len(refs) == 1, overlay
    settings = configmap(objects, refs[0])["data"]
    assert {"AUTODIDACT_EXPORT_URL", "AUTODIDACT_INPUT_ROOT"} <= set(settings)
    samples = {
        "AUTODIDACT_EXPORT_URL": "s3://bucket/exports",
        "AUTODIDACT_INPUT_ROOT": "s3://a/,s3://b/",
        "AUTODIDACT_EXPORT_URL_TTL": "60",
    }
    for key, value in settings.items():
        # As shipped: what the coordinator gets without them (no export bucket, no input roots).
        monkeypatch.setenv(key, value)
    shipped = _parser().parse_args(["serve", "coordinator"])
    assert shipped.export_url == "" and shipped.input_root == [] and shipped.export_url_ttl > 0
    for key in settings:  # every key is one the CLI reads: setting it changes what `serve` gets
        monkeypatch.setenv(key, samples[key])
        assert vars(_parser().parse_args(["serve", "coordinator"])) != vars(shipped), key
        monkeypatch.setenv(key, settings[key])
    monkeypatch.setenv("AUTODIDACT_INPUT_ROOT", samples["AUTODIDACT_INPUT_ROOT"])
    assert _parser().parse_args(["serve", "coordinator"]).input_root == ["s3://a/", "s3://b/"]
    # Static cloud credentials are optional (workload identity needs none).
    secrets = [source["secretRef"] for source in container.get("envFrom", []) if "secretRef" in source]
    assert all(ref.get("optional") is True for ref in secrets), overlay


def test_the_coordinator_may_reach_object_stores_over_https(rendered):
    _, objects = rendered
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "coordinator-object-store")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "coordinator"}
    assert policy["spec"]["egress"] == [{"ports": [{"protocol": "TCP", "port": 443}]}]


@pytest.mark.parametrize("components", [("tls",), COMPONENTS])
def test_tls_components_serve_the_coordinator_over_tls_from_secrets(components, tmp_path):
    objects = render_with_components(tmp_path, "gpu", components)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    check_auth_wiring(objects, "+".join(components))
    pod, container = autodidact_containers(objects)["coordinator"]
    args = parsed("coordinator", container)
    settings = _auth_settings(args)
    assert mounted_file(pod, container, str(settings.tls_cert), objects) == {"secret": "coordinator-tls"}
    assert mounted_file(pod, container, str(settings.tls_key), objects) == {"secret": "coordinator-tls"}
    assert (settings.tls_client_ca is not None) == ("mutual-tls" in components)
    # The kubelet's gRPC probes speak plaintext: TCP probes on the TLS port instead.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe].get("tcpSocket") == {"port": DEFAULT_PORTS["coordinator"]}, probe
    # The other services are unchanged.
    for name, (_, other) in autodidact_containers(objects).items():
        if name != "coordinator":
            assert parsed(name, other).tls_cert is None and "grpc" in other["readinessProbe"], name


# --- dedup shards, and the `ha` overlay ---


def dedup_shards(objects: list[dict]) -> list[str]:
    """The dedup addresses the coordinator routes to, in shard order (one when unsharded)."""
    _, container = autodidact_containers(objects)["coordinator"]
    return parsed("coordinator", container).dedup_target.split(",")


def anti_affinity_spreads(pod: dict) -> bool:
    """Whether the pod template keeps its replicas off each other's nodes (preferred or required)."""
    own = pod.get("metadata", {}).get("labels", {})
    anti = pod["spec"].get("affinity", {}).get("podAntiAffinity", {})
    terms = [w["podAffinityTerm"] for w in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    terms += pod["spec"].get("topologySpreadConstraints", [])
    return any(
        term["topologyKey"] == "kubernetes.io/hostname" and term["labelSelector"]["matchLabels"].items() <= own.items()
        for term in terms
        if term.get("labelSelector", {}).get("matchLabels")
    )


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels, matchExpressions with In) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def policy_allows(objects: list[dict], source: dict, destination: dict, port: int, source_namespace: str | None = None) -> bool:
    """Whether the NetworkPolicies let pods labelled `source` (in this namespace, or in
    `source_namespace`) open TCP `port` on pods labelled `destination` in this namespace:
    egress from the source too when the source is in this namespace."""
    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"]

    def admitted(direction: str, subject: dict, peer: dict, peer_key: str, namespace: str | None) -> bool:
        for policy in policies:
            if direction.capitalize() not in policy["policyTypes"] or not selects(policy["podSelector"], subject):
                continue
            for rule in policy.get(direction, []):
                if not any(p.get("protocol", "TCP") == "TCP" and p.get("port") == port for p in rule.get("ports", [{"port": port}])):
                    continue
                peers = rule.get(peer_key)
                if peers is None:
                    return True
                for entry in peers:
                    if "ipBlock" in entry:
                        continue
                    if "namespaceSelector" in entry:
                        wanted = entry["namespaceSelector"].get("matchLabels", {})
                        if namespace is None or wanted not in ({}, {"kubernetes.io/metadata.name": namespace}):
                            continue
                    elif namespace is not None:
                        continue
                    if selects(entry.get("podSelector", {}), peer):
                        return True
        return False

    ingress = admitted("ingress", destination, source, "from", source_namespace)
    egress = source_namespace is not None or admitted("egress", source, destination, "to", None)
    return ingress and egress


def test_dedup_runs_one_pod_per_shard_the_coordinator_routes_to(rendered):
    overlay, objects = rendered
    shards = dedup_shards(objects)
    dedup = workloads(objects)["dedup"]
    assert dedup["kind"] == "StatefulSet" and dedup["spec"]["serviceName"] == "dedup", overlay
    assert dedup["spec"]["replicas"] == len(shards), f"{overlay}: {dedup['spec']['replicas']} dedup pods, {len(shards)} shards"
    container = dedup["spec"]["template"]["spec"]["containers"][0]
    if len(shards) == 1:
        assert shards == [f"dns:///dedup:{DEFAULT_PORTS['dedup']}"], overlay
        assert "--shard" not in container.get("args", []) and parsed("dedup", container).shard is None, overlay
        return
    assert shards == [f"dns:///dedup-{i}.dedup:{DEFAULT_PORTS['dedup']}" for i in range(len(shards))], overlay
    args = container["args"]
    (variable,) = pod_index_variables(container)
    assert args[args.index("--shard") + 1] == f"$({variable})/{len(shards)}", overlay
    for index in range(len(shards)):  # pod dedup-<index> serves shard index
        shard = parsed("dedup", container, index).shard
        assert (shard.index, shard.count) == (index, len(shards)), overlay


def test_base_dedup_is_a_statefulset_with_a_volume_per_pod():
    objects = kustomize(K8S / "base")
    assert ("PersistentVolumeClaim", "dedup-data") not in {(o["kind"], o["metadata"]["name"]) for o in objects}
    dedup = workloads(objects)["dedup"]
    assert dedup["kind"] == "StatefulSet" and dedup["spec"]["replicas"] == 1
    assert dedup["spec"]["podManagementPolicy"] == "Parallel"
    assert dedup["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    (claim,) = dedup["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    pod = dedup["spec"]["template"]["spec"]
    assert claim["metadata"]["name"] not in {v["name"] for v in pod["volumes"]}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == "/var/lib/autodidact"
    # The base coordinator stays single, on SQLite under its own volume.
    coordinator = workloads(objects)["coordinator"]
    assert coordinator["spec"]["replicas"] == 1 and coordinator["spec"]["strategy"]["type"] == "Recreate"


def test_several_coordinators_share_a_postgres_store_and_a_readwritemany_volume(rendered):
    """One coordinator: SQLite on its ReadWriteOnce volume, replaced with Recreate. Several:
    the job store in PostgreSQL (the DSN from a Secret), the data folder on ReadWriteMany."""
    overlay, objects = rendered
    coordinator = workloads(objects)["coordinator"]
    pod, container = autodidact_containers(objects)["coordinator"]
    env = {e["name"]: e for e in container.get("env", [])}
    claim_name = next(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if v["name"] == "data")
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == claim_name)
    assert "--store-dsn" not in container.get("args", []), f"{overlay}: a DSN in the args shows in the process list"
    if coordinator["spec"]["replicas"] == 1:
        assert coordinator["spec"]["strategy"]["type"] == "Recreate", overlay
        assert "AUTODIDACT_STORE_DSN" not in env, overlay
        return
    assert "value" not in env["AUTODIDACT_STORE_DSN"], f"{overlay}: the DSN holds a password: a Secret, not a literal"
    assert set(env["AUTODIDACT_STORE_DSN"]["valueFrom"]["secretKeyRef"]) == {"name", "key"}, overlay
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], f"{overlay}: the replicas share --data-dir"
    assert coordinator["spec"]["strategy"]["type"] == "RollingUpdate", overlay


def test_ha_runs_several_coordinators_and_shards_spread_over_nodes_with_disruption_budgets():
    objects = render("ha")
    found = workloads(objects)
    budgets = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"}
    coordinator, dedup = found["coordinator"], found["dedup"]
    assert coordinator["spec"]["replicas"] >= 2
    assert 1 <= budgets["coordinator"]["minAvailable"] < coordinator["spec"]["replicas"]
    assert "maxUnavailable" not in budgets["coordinator"]
    assert dedup["spec"]["replicas"] >= 2 and len(dedup_shards(objects)) == dedup["spec"]["replicas"]
    assert budgets["dedup"] == {"maxUnavailable": 1, "selector": dedup["spec"]["selector"]}
    for workload in (coordinator, dedup):
        assert anti_affinity_spreads(workload["spec"]["template"]), workload["metadata"]["name"]
    _, container = autodidact_containers(objects)["coordinator"]
    assert parsed("coordinator", container).lease_seconds > 0
    # The single-node overlays are unchanged.
    for overlay in ("local-cpu", "gpu"):
        assert len(dedup_shards(render(overlay))) == 1, overlay


def test_ha_postgres_cluster_is_the_one_the_coordinators_read():
    """CloudNativePG's Cluster (no schema offline without its CRD): a replicated cluster whose
    application Secret (<name>-app, key uri) is the one the coordinators take their DSN from."""
    objects = render("ha")
    custom = [o for o in objects if o["apiVersion"].startswith(CUSTOM_API_GROUPS)]
    assert [(o["apiVersion"], o["kind"]) for o in custom] == [("postgresql.cnpg.io/v1", "Cluster")]
    (cluster,) = custom
    spec = cluster["spec"]
    assert set(cluster) == {"apiVersion", "kind", "metadata", "spec"}
    assert isinstance(spec["instances"], int) and spec["instances"] >= 3
    assert re.fullmatch(r"[0-9]+(Mi|Gi|Ti)", spec["storage"]["size"])
    initdb = spec["bootstrap"]["initdb"]
    assert initdb["database"] == "autodidact" and initdb["owner"] == "autodidact"
    assert spec["affinity"]["topologyKey"] == "kubernetes.io/hostname"
    name = cluster["metadata"]["name"]
    _, container = autodidact_containers(objects)["coordinator"]
    dsn = next(e for e in container["env"] if e["name"] == "AUTODIDACT_STORE_DSN")
    assert dsn["valueFrom"]["secretKeyRef"] == {"name": f"{name}-app", "key": "uri"}
    assert secret_data(objects, f"{name}-app") is None, "the operator creates the Secret; the manifests must not"
    assert cluster["metadata"]["namespace"] == workloads(objects)["coordinator"]["metadata"]["namespace"]
    # The network: coordinators -> PostgreSQL, the instances to each other, the operator -> the instances.
    instances = {"cnpg.io/cluster": name}
    coordinators = {"app.kubernetes.io/name": "coordinator"}
    operator = {"app.kubernetes.io/name": "cloudnative-pg"}
    assert policy_allows(objects, coordinators, instances, 5432)
    for port in (5432, 8000):
        assert policy_allows(objects, instances, instances, port), port
        assert policy_allows(objects, operator, instances, port, source_namespace="cnpg-system"), port
    assert not policy_allows(objects, {"app.kubernetes.io/name": "generator"}, instances, 5432)
    assert not policy_allows(objects, coordinators, instances, 5432, source_namespace="elsewhere")
