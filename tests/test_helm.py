"""The Helm chart (config/helm/cmek-proxy), rendered by Helm itself and schema-validated.

Rendering uses ``helm-python-sdk`` (Helm's own Go SDK, v4, through its C ABI: the same
template engine and functions as ``helm template``). Every rendered object is validated
against the Kubernetes OpenAPI schemas of ``kubernetes-validate`` in strict mode (unknown
fields are errors) for the oldest supported version (1.29, native sidecars) and the newest
the package ships. The proxy's part of the ConfigMap is parsed by the proxy's own config
loader, with the Secret's overrides, so the chart cannot ship a config the proxy refuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import parse_config

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parent.parent / "config" / "helm" / "cmek-proxy"
VERSIONS = ["1.29.0", kv.utils.latest_version() + ".0"]

SECRET_ENV = {
    "CMEK_PROXY__CLIENTS": "[{access_key: APPKEY01, secret_key: app-secret-key-1}]",
    "CMEK_PROXY__BACKEND__ACCESS_KEY": "BACKENDKEY",
    "CMEK_PROXY__BACKEND__SECRET_KEY": "backend-secret",
    "CMEK_PROXY__ENCRYPTION__DEFAULT__KEY": "aws-kms://arn:aws:kms:eu-west-1:111122223333:key/k",
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "aws-irsa": {
        "serviceAccount": {
            "workloadIdentity": {"aws": {"roleArn": "arn:aws:iam::111122223333:role/orders"}}
        }
    },
    "gke": {
        "serviceAccount": {
            "workloadIdentity": {"gcp": {"serviceAccount": "orders@acme.iam.gserviceaccount.com"}}
        }
    },
    "azure": {
        "serviceAccount": {
            "workloadIdentity": {"azure": {"clientId": "1111-2222", "tenantId": "3333"}}
        }
    },
    "minimal": {
        "networkPolicy": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "service": {"enabled": False},
        "serviceAccount": {"create": False, "name": "existing"},
        "metrics": {"podAnnotations": False},
    },
    "custom": {
        "proxy": {"s3Port": 9000, "adminPort": 9001, "extraEnv": [{"name": "X", "value": "1"}]},
        "podDisruptionBudget": {"maxUnavailable": "25%"},
        "networkPolicy": {"appFrom": [{"podSelector": {"matchLabels": {"role": "frontend"}}}]},
        "app": {"env": [{"name": "LOG", "value": "debug"}], "args": ["--serve"]},
    },
}


def render(values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """kind -> rendered objects."""
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name="orders", namespace="prod")
    out: dict[str, list[dict[str, Any]]] = {}
    for text in manifests.values():
        for doc in yaml.safe_load_all(text):
            if doc:
                out.setdefault(doc["kind"], []).append(doc)
    return out


def test_lint_is_clean() -> None:
    report = helm.lint(str(CHART), strict=True, kube_version="v1.29.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_renders_valid_kubernetes_objects(name: str) -> None:
    objects = render(VALUE_SETS[name])
    assert objects["Deployment"] and objects["ConfigMap"]
    for kind, docs in objects.items():
        for doc in docs:
            for version in VERSIONS:
                kv.validate(doc, version, strict=True)  # raises on any schema violation
            assert doc["metadata"]["name"].startswith("orders-"), (kind, doc["metadata"])


def _pod(objects: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (deployment,) = objects["Deployment"]
    pod: dict[str, Any] = deployment["spec"]["template"]
    return pod


def test_the_proxy_is_a_native_sidecar_that_starts_before_the_app() -> None:
    pod = _pod(render({}))
    (proxy,) = pod["spec"]["initContainers"]
    assert proxy["name"] == "cmek-proxy" and proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (app,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in app["env"]}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://127.0.0.1:8080"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == (
        "cmek-proxy-secrets"
    )
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize(
    "name,annotation,value",
    [
        ("aws-irsa", "eks.amazonaws.com/role-arn", "arn:aws:iam::111122223333:role/orders"),
        ("gke", "iam.gke.io/gcp-service-account", "orders@acme.iam.gserviceaccount.com"),
        ("azure", "azure.workload.identity/client-id", "1111-2222"),
    ],
)
def test_service_account_carries_the_workload_identity(
    name: str, annotation: str, value: str
) -> None:
    objects = render(VALUE_SETS[name])
    (sa,) = objects["ServiceAccount"]
    assert sa["metadata"]["annotations"][annotation] == value
    pod = _pod(objects)
    assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    if name == "azure":  # Azure's webhook injects the token only into labelled pods
        assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
        assert sa["metadata"]["annotations"]["azure.workload.identity/tenant-id"] == "3333"
    else:
        assert "azure.workload.identity/use" not in pod["metadata"]["labels"]


def test_network_policy_lets_only_the_listed_peers_reach_the_admin_port() -> None:
    objects = render(VALUE_SETS["custom"])
    (policy,) = objects["NetworkPolicy"]
    admin, app = policy["spec"]["ingress"]
    assert admin["ports"] == [{"protocol": "TCP", "port": 9001}]
    assert admin["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert app["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert app["from"] == [{"podSelector": {"matchLabels": {"role": "frontend"}}}]
    assert all(p["port"] != 9000 for rule in policy["spec"]["ingress"] for p in rule["ports"])
    pod = _pod(objects)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_pod_disruption_budget() -> None:
    (pdb,) = render({})["PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    (pdb,) = render(VALUE_SETS["custom"])["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == "25%" and "minAvailable" not in pdb["spec"]
    assert "PodDisruptionBudget" not in render(VALUE_SETS["minimal"])


@pytest.mark.parametrize("name", ["defaults", "custom"])
def test_the_configmap_is_a_config_the_proxy_accepts(name: str) -> None:
    objects = render(VALUE_SETS[name])
    (cm,) = objects["ConfigMap"]
    tree = yaml.safe_load(cm["data"]["config.yaml"])
    config = parse_config(tree, environ=SECRET_ENV)
    (proxy,) = _pod(objects)["spec"]["initContainers"]
    assert config.listen.host == "127.0.0.1"
    assert config.listen.port == proxy["ports"][0]["containerPort"]
    assert config.admin.port == proxy["ports"][1]["containerPort"]
    assert {e["name"] for e in proxy["env"]} >= set(SECRET_ENV)
    assert proxy["args"] == ["serve", "--config", "/etc/cmek-proxy/config.yaml"]


@pytest.mark.parametrize(
    "values,where",
    [
        ({"proxy": {"config": {"backend": {"secret_key": "x"}}}}, "/proxy/config/backend"),
        ({"proxy": {"config": {"clients": []}}}, "/proxy/config"),
        ({"proxy": {"adminPort": 0}}, "/proxy/adminPort"),
        ({"app": {"name": "cmek-proxy"}}, "/app/name"),
        ({"serviceAccount": {"workloadIdentity": {"aws": {"roleArn": "role"}}}}, "roleArn"),
        ({"proxy": {"secretEnv": {"AWS_SECRET": "k"}}}, "AWS_SECRET"),
    ],
)
def test_the_values_schema_refuses_secrets_and_nonsense(values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError) as exc:
        chart.validate_schema(values)
    assert where in str(exc.value)


EXAMPLES = sorted((CHART.parent.parent / "kubernetes").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_plain_kubernetes_examples_are_valid(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        for version in VERSIONS:
            kv.validate(doc, version, strict=True)


def test_the_plain_example_is_a_native_sidecar_too() -> None:
    (doc,) = yaml.safe_load_all(
        (CHART.parent.parent / "kubernetes" / "deployment.yaml").read_text()
    )
    spec = doc["spec"]["template"]["spec"]
    (proxy,) = spec["initContainers"]
    assert proxy["name"] == "cmek-proxy" and proxy["restartPolicy"] == "Always"
    assert "startupProbe" in proxy
    assert [c["name"] for c in spec["containers"]] == ["app"]
