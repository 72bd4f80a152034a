"""The Helm chart, linted and rendered by the real Helm library (``helm-python-sdk`` binds
Helm's Go SDK; no ``helm`` binary and no cluster are needed), for the default values and a
matrix of variants. Every rendered object is validated against the Kubernetes JSON schemas
that ``kubernetes-validate`` ships (strict: unknown fields fail), except the two CRD kinds
(ServiceMonitor, HTTPRoute), whose schemas no offline package ships: their fields that matter
are checked here instead. The controller's RBAC is exactly the minimal set, and
``values.schema.json`` rejects bad values."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from engine_service.engine import EngineStats
from engine_service.metrics import EngineMetrics
from gateway.metrics import GatewayMetrics

CHART = Path(__file__).parents[2] / "helm" / "switchyard"
RELEASE, NAMESPACE = "sy", "serving"
KUBE_VERSIONS = ("1.30.0", "1.35.0")  # the chart's floor (kubeVersion) and a recent one
CRD_KINDS = {"ServiceMonitor", "HTTPRoute"}

MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "replicas": {"gateway": {"replicas": 3}, "controller": {"replicas": 2},
                 "engine": {"replicas": 4}},
    "redis-on": {"redis": {"enabled": True}},
    "redis-external": {"redis": {"externalUrl": "redis://cache.example:6379/2"}},
    "redis-off-kv-off": {"kvService": {"enabled": False}},
    "ingress-on": {"ingress": {"enabled": True, "className": "nginx",
                               "tls": [{"secretName": "tls", "hosts": ["switchyard.local"]}]}},
    "existing-secret": {"secret": {"existingSecret": "my-keys"}},
    "api-keys": {"secret": {"apiKeys": ["sk-a", "sk-b"], "hfToken": "hf_x"}},
    "gpu-on": {"engine": {"gpu": {"enabled": True, "count": 2},
                          "nodeSelector": {"nvidia.com/gpu.present": "true"}},
               "model": {"name": "meta-llama/Llama-3.2-1B-Instruct", "cache": {"size": "50Gi"}}},
    "parallel": {"engine": {"gpu": {"enabled": True},
                            "parallel": {"tensorParallelSize": 4, "enableExpertParallel": True}}},
    "model-pvc": {"model": {"name": "llama-3.2-1b", "pvc": {"claimName": "models"}}},
    "autoscaling": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8}},
    "tools-and-limits": {"toolService": {"mcpServers": ["docs=http://docs-mcp:8080/mcp",
                                                        "git=uvx mcp-server-git"],
                                         "allowOutboundMcp": True,
                                         "fileSearchVolumes": [{"mountPath": "/srv/handbook",
                                                                "configMap": "handbook"}]},
                         "gateway": {"replicas": 2,
                                     "rateLimits": {"rpm": 60, "tpm": 100000, "failOpen": False}},
                         "redis": {"enabled": True},
                         "secret": {"apiKeys": ["sk-a rpm=5"], "adminKey": "sk-admin"}},
    "tools-off": {"toolService": {"enabled": False}},
    "dashboard": {"serviceMonitor": {"enabled": True},
                  "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
                  "engine": {"maxQueuedRequests": 32}},
    "lora": {"lora": {"enabled": True, "modules": ["sql=/adapters/sql",
                                                   {"name": "chat", "path": "org/chat-lora"}],
                      "maxLoras": 4, "maxLoraRank": 32, "adaptersClaim": "adapters"}},
    "disaggregated": {"engine": {"prefill": {"replicas": 2}, "decode": {"replicas": 3},
                                 "gpu": {"enabled": True}}},
    "monitoring-and-route": {"serviceMonitor": {"enabled": True},
                             "httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}],
                                           "hostnames": ["llm.example"]}},
}  # fmt: skip


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    deployment = one(objects, "Deployment", f"{RELEASE}-switchyard-{component}")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0]


def config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = one(objects, "ConfigMap", f"{RELEASE}-switchyard-config")
    parsed: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    return parsed


@pytest.mark.parametrize("variant", sorted(MATRIX))
def test_lints_clean(variant: str) -> None:
    report = helm.lint(CHART, MATRIX[variant], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == []


@pytest.mark.parametrize("variant", sorted(MATRIX))
def test_every_object_validates_against_the_kubernetes_schemas(
    chart: helm.Chart, variant: str
) -> None:
    chart.validate_schema(MATRIX[variant])
    objects = render(chart, MATRIX[variant])
    assert {"Deployment", "Service", "ConfigMap", "Role", "PodDisruptionBudget"} <= {
        o["kind"] for o in objects
    }
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_default_render_holds_every_service(chart: helm.Chart) -> None:
    objects = render(chart, {})
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    assert deployments == {f"{RELEASE}-switchyard-{c}" for c in ("gateway", "controller",
                                                                  "engine", "kv", "tools")}  # fmt: skip
    components = ("gateway", "controller", "engine", "kv", "tools")
    assert [container(objects, c)["args"] for c in components] == [
        ["gateway"],
        ["controller"],
        ["engine"],
        ["kv"],
        ["tools"],
    ]
    one(objects, "PersistentVolumeClaim", f"{RELEASE}-switchyard-kv")
    assert {o["kind"] for o in objects}.isdisjoint({"Ingress", "HTTPRoute", "ServiceMonitor"})


def rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    role = one(objects, "Role", f"{RELEASE}-switchyard-controller")
    return [{k: sorted(v) for k, v in rule.items()} for rule in role["rules"]]


ENGINE_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": ["apps"], "resources": ["deployments/scale"],
     "resourceNames": [f"{RELEASE}-switchyard-engine"], "verbs": ["get", "patch"]},
]  # fmt: skip


def test_rbac_is_the_minimal_namespaced_set(chart: helm.Chart) -> None:
    objects = render(chart, {})
    assert rules(objects) == ENGINE_RULES
    assert not {"ClusterRole", "ClusterRoleBinding"} & {o["kind"] for o in objects}
    binding = one(objects, "RoleBinding", f"{RELEASE}-switchyard-controller")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": NAMESPACE,
                                    "name": f"{RELEASE}-switchyard-controller"}]  # fmt: skip
    controller_pod = one(objects, "Deployment", f"{RELEASE}-switchyard-controller")
    assert controller_pod["spec"]["template"]["spec"]["serviceAccountName"] == (
        f"{RELEASE}-switchyard-controller"
    )
    for component in ("gateway", "engine", "kv"):  # no API access for the others
        pod = one(objects, "Deployment", f"{RELEASE}-switchyard-{component}")["spec"]["template"]
        assert pod["spec"]["automountServiceAccountToken"] is False


def test_leases_are_granted_only_with_more_than_one_controller(chart: helm.Chart) -> None:
    objects = render(chart, {"controller": {"replicas": 2}})
    assert rules(objects) == [
        *ENGINE_RULES,
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": [f"{RELEASE}-switchyard-controller"], "verbs": ["get", "update"]},
    ]  # fmt: skip
    assert config(objects)["controller"]["leader_election"] is True
    assert config(render(chart, {}))["controller"]["leader_election"] is False


def test_engine_probes_use_the_grpc_health_service(chart: helm.Chart) -> None:
    engine = container(render(chart, {}), "engine")
    for probe in ("startupProbe", "readinessProbe"):
        assert engine[probe]["grpc"] == {"port": 50100, "service": "switchyard.v1.EngineService"}
    assert engine["livenessProbe"]["grpc"] == {"port": 50100}
    assert (
        engine["startupProbe"]["failureThreshold"] * engine["startupProbe"]["periodSeconds"] >= 900
    )
    assert engine["lifecycle"]["preStop"] == {"sleep": {"seconds": 30}}


def test_gateway_readiness_is_whether_it_can_serve_and_liveness_whether_it_answers(
    chart: helm.Chart,
) -> None:
    """Readiness follows /health (a routable engine replica); liveness and startup follow
    /live, which stays 200 through engine and controller outages."""
    gateway = container(render(chart, {}), "gateway")
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    for probe in ("livenessProbe", "startupProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/live", "port": "http"}


def test_the_controller_finds_what_the_chart_creates(chart: helm.Chart) -> None:
    objects = render(chart, {})
    settings = config(objects)
    engine = one(objects, "Deployment", f"{RELEASE}-switchyard-engine")
    pod_labels = engine["spec"]["template"]["metadata"]["labels"]
    selector = dict(
        term.split("=") for term in settings["controller"]["engine_selector"].split(",")
    )
    assert selector.items() <= pod_labels.items()
    assert settings["controller"]["engine_deployment"] == engine["metadata"]["name"]
    controller_service = one(objects, "Service", f"{RELEASE}-switchyard-controller")
    address = (
        f"{controller_service['metadata']['name']}:{controller_service['spec']['ports'][0]['port']}"
    )
    assert settings["engine"]["controller_address"] == address
    assert settings["gateway"]["controller_address"] == address
    assert settings["engine"]["kv_service_address"] == f"{RELEASE}-switchyard-kv:50060"
    env = {e["name"]: e.get("valueFrom", {}) for e in container(objects, "engine")["env"]}
    assert env["SWITCHYARD_REPLICA_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_existing_secret_is_used_and_none_is_created(chart: helm.Chart) -> None:
    objects = render(chart, MATRIX["existing-secret"])
    assert not [o for o in objects if o["kind"] == "Secret"]
    gateway = one(objects, "Deployment", f"{RELEASE}-switchyard-gateway")["spec"]["template"]
    volumes = {v["name"]: v for v in gateway["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "my-keys"
    assert config(objects)["gateway"]["api_key_file"] == "/etc/switchyard-keys/api-keys"


def test_api_keys_go_into_the_charts_secret(chart: helm.Chart) -> None:
    objects = render(chart, MATRIX["api-keys"])
    secret = one(objects, "Secret", f"{RELEASE}-switchyard-secrets")
    assert secret["stringData"]["api-keys"].split() == ["sk-a", "sk-b"]
    assert secret["stringData"]["hf-token"] == "hf_x"
    assert "api_key_file" not in config(render(chart, {}))["gateway"]  # default: no auth


def test_gpu_engines_ask_for_gpus_and_run_on_cuda(chart: helm.Chart) -> None:
    objects = render(chart, MATRIX["gpu-on"])
    engine = container(objects, "engine")
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert config(objects)["engine"]["device"] == "cuda"
    pod = one(objects, "Deployment", f"{RELEASE}-switchyard-engine")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert "nvidia.com/gpu" not in str(container(render(chart, {}), "engine")["resources"])


def test_a_parallel_engine_pod_asks_for_a_gpu_per_rank(chart: helm.Chart) -> None:
    from switchyard.settings import EngineSettings

    objects = render(chart, MATRIX["parallel"])
    assert container(objects, "engine")["resources"]["limits"]["nvidia.com/gpu"] == 4
    engine = config(objects)["engine"]
    assert engine["tensor_parallel_size"] == 4 and engine["enable_expert_parallel"] is True
    settings = EngineSettings(**{k: v for k, v in engine.items() if k != "model"})
    assert (settings.tensor_parallel_size, settings.data_parallel_size) == (4, 1)
    # The ranks' product wins over gpu.count; one rank keeps gpu.count.
    two = {"engine": {"gpu": {"enabled": True, "count": 3},
                      "parallel": {"tensorParallelSize": 2}}}  # fmt: skip
    assert container(render(chart, two), "engine")["resources"]["limits"]["nvidia.com/gpu"] == 2
    # Data-parallel attention: a GPU per data-parallel rank too.
    dp = {"engine": {"gpu": {"enabled": True},
                     "parallel": {"dataParallelSize": 2, "enableExpertParallel": True}}}  # fmt: skip
    objects = render(chart, dp)
    assert container(objects, "engine")["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert config(objects)["engine"]["data_parallel_size"] == 2
    defaults = config(render(chart, {}))["engine"]
    assert not {"tensor_parallel_size", "data_parallel_size", "enable_expert_parallel"} & set(
        defaults
    )


def test_redis_is_optional_and_may_be_external(chart: helm.Chart) -> None:
    on = render(chart, MATRIX["redis-on"])
    one(on, "Deployment", f"{RELEASE}-switchyard-redis")
    assert config(on)["kv"]["kv_store"] == f"redis://{RELEASE}-switchyard-redis:6379/0"
    external = render(chart, MATRIX["redis-external"])
    assert not [o for o in external if o["metadata"]["name"].endswith("-redis")]
    assert config(external)["kv"]["kv_store"] == "redis://cache.example:6379/2"
    assert config(render(chart, {}))["kv"]["kv_store"] == "disk:/var/lib/switchyard-kv"


def test_without_the_kv_service_engines_are_not_pointed_at_it(chart: helm.Chart) -> None:
    objects = render(chart, MATRIX["redis-off-kv-off"])
    assert "kv_service_address" not in config(objects)["engine"]
    assert not [o for o in objects if o["metadata"]["name"].endswith("-kv")]


def test_lora_values_become_the_engines_settings_and_mount_the_adapters(chart: helm.Chart) -> None:
    from switchyard.lora_modules import parse_lora_modules
    from switchyard.settings import EngineSettings

    objects = render(chart, MATRIX["lora"])
    engine = config(objects)["engine"]
    assert engine["enable_lora"] is True and engine["max_loras"] == 4
    assert engine["max_lora_rank"] == 32 and "max_cpu_loras" not in engine
    settings = EngineSettings(lora_modules=engine["lora_modules"])
    assert [(m.name, m.path) for m in parse_lora_modules(settings.lora_modules)] == [
        ("sql", "/adapters/sql"),
        ("chat", "org/chat-lora"),
    ]
    mounts = container(objects, "engine")["volumeMounts"]
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in mounts
    assert "enable_lora" not in config(render(chart, {}))["engine"]


def test_ingress_and_route_lead_to_the_gateway(chart: helm.Chart) -> None:
    ingress = one(render(chart, MATRIX["ingress-on"]), "Ingress", f"{RELEASE}-switchyard")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-switchyard-gateway", "port": {"name": "http"}}
    objects = render(chart, MATRIX["monitoring-and-route"])
    route = one(objects, "HTTPRoute", f"{RELEASE}-switchyard")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "gw"}]
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"name": f"{RELEASE}-switchyard-gateway", "port": 8000}
    ]
    monitors = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceMonitor"}
    assert sorted(monitors) == [f"{RELEASE}-switchyard-{c}" for c in ("engine", "gateway", "kv")]
    for name, monitor in monitors.items():
        service = one(objects, "Service", name)
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["port"] in ports
        assert monitor["spec"]["selector"]["matchLabels"].items() <= (
            service["metadata"]["labels"].items()
        )


def test_the_grafana_dashboard_ships_as_a_sidecar_configmap_with_every_panel(
    chart: helm.Chart,
) -> None:
    assert not any(o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]
                   for o in render(chart, {}))  # fmt: skip
    objects = render(chart, MATRIX["dashboard"])
    configmap = one(objects, "ConfigMap", f"{RELEASE}-switchyard-dashboard")
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["switchyard.json"])
    titles = " | ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for subject in ("request rate", "time to first token", "inter-token latency", "queue depth",
                    "kv-cache usage", "prefix-cache hit rate"):  # fmt: skip
        assert subject in titles, subject
    per_replica = [p for p in dashboard["panels"] if "per replica" in p["title"]]
    assert all("pod" in t["expr"] for p in per_replica for t in p["targets"])


def test_the_dashboard_queries_only_metrics_the_services_export() -> None:
    """Every metric a panel queries is in the real engine's or gateway's registry."""
    stats = EngineStats(0, 0, 0.0, 1, 1, 0, 0, 0, 0, 0, 0)
    exported: set[str] = set()
    for registry in (EngineMetrics("m", lambda: stats).registry, GatewayMetrics().registry):
        for family in registry.collect():
            # Labelled families may have no sample yet: name the series by the family's type.
            suffix = {"counter": "_total", "histogram": "_bucket"}.get(family.type, "")
            exported.add(family.name + suffix)
    dashboard = json.loads((CHART / "dashboards" / "switchyard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"([a-z_:]+)\{", target["expr"])
    }
    assert queried and queried <= exported, queried - exported


def test_the_engines_queue_bound_reaches_their_settings(chart: helm.Chart) -> None:
    assert "max_queued_requests" not in config(render(chart, {}))["engine"]
    assert config(render(chart, MATRIX["dashboard"]))["engine"]["max_queued_requests"] == 32


def test_with_the_autoscaler_the_chart_leaves_the_engine_count_alone(chart: helm.Chart) -> None:
    objects = render(chart, MATRIX["autoscaling"])
    assert "replicas" not in one(objects, "Deployment", f"{RELEASE}-switchyard-engine")["spec"]
    controller = config(objects)["controller"]
    assert (controller["autoscale"], controller["autoscale_min"], controller["autoscale_max"]) == (
        True, 2, 8,
    )  # fmt: skip


@pytest.mark.parametrize(
    "values",
    [
        {"engine": {"replicas": -1}},
        {"gateway": {"replicas": "3"}},
        {"controller": {"port": 70000}},
        {"engine": {"gpu": {"enabled": "yes"}}},
        {"autoscaling": {"targetKvCacheUsage": 1.5}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"redis": {"externalUrl": "cache:6379"}},
        {"httpRoute": {"enabled": True}},  # a route needs a parent Gateway
        {"engine": {"replicsa": 2}},  # a typo is not silently ignored
        {"toolService": {"mcpServers": ["no label"]}},
        {"toolService": {"fileSearchVolumes": [{"mountPath": "/srv"}]}},  # from where?
        {"gateway": {"rateLimits": {"rpm": -1}}},
        {"engine": {"maxQueuedRequests": -1}},
        {"grafanaDashboard": {"enabled": True, "lables": {}}},
        {"lora": {"modules": ["no-path"]}},
        {"lora": {"maxLoras": 0}},
        {"engine": {"parallel": {"tensorParallelSize": 0}}},
        {"engine": {"parallel": {"expertParallel": True}}},  # misspelt
    ],
)
def test_the_values_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_an_inverted_autoscaling_range_fails_to_render(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="minReplicas"):
        render(chart, {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}})


def test_notes_tell_how_to_reach_the_gateway(chart: helm.Chart) -> None:
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["switchyard/templates/NOTES.txt"]
    assert f"port-forward service/{RELEASE}-switchyard-gateway 8000:8000" in notes
    ingress_notes = chart.render(MATRIX["ingress-on"], name=RELEASE, namespace=NAMESPACE)[
        "switchyard/templates/NOTES.txt"
    ]
    assert "https://switchyard.local/v1" in ingress_notes


def test_the_tool_service_is_deployed_and_the_gateway_points_at_it(chart: helm.Chart) -> None:
    objects = render(chart, MATRIX["tools-and-limits"])
    tools = container(objects, "tools")
    assert tools["readinessProbe"]["grpc"] == {
        "port": 50070,
        "service": "switchyard.v1.ToolService",
    }
    assert {"name": "search-0", "mountPath": "/srv/handbook", "readOnly": True} in tools[
        "volumeMounts"
    ]
    service = one(objects, "Service", f"{RELEASE}-switchyard-tools")
    assert service["spec"]["ports"][0]["port"] == 50070
    settings = config(objects)
    assert settings["tools"]["mcp_servers"] == [
        "docs=http://docs-mcp:8080/mcp",
        "git=uvx mcp-server-git",
    ]
    assert settings["tools"]["file_search_roots"] == ["/srv/handbook"]
    assert settings["tools"]["allow_outbound_mcp"] is True
    gateway = settings["gateway"]
    assert gateway["tool_service_address"] == f"{RELEASE}-switchyard-tools:50070"
    assert gateway["allow_outbound_mcp"] is True
    # Two gateways share their limits through the chart's Redis.
    assert gateway["redis_url"] == f"redis://{RELEASE}-switchyard-redis:6379/0"
    assert (gateway["rate_limit_rpm"], gateway["rate_limit_tpm"]) == (60, 100000)
    assert gateway["rate_limit_fail_open"] is False


def test_the_admin_key_reaches_the_gateway_from_the_secret(chart: helm.Chart) -> None:
    objects = render(chart, MATRIX["tools-and-limits"])
    secret = one(objects, "Secret", f"{RELEASE}-switchyard-secrets")
    assert secret["stringData"]["admin-key"] == "sk-admin"
    assert "sk-a rpm=5" in secret["stringData"]["api-keys"]
    env = {e["name"]: e for e in container(objects, "gateway")["env"]}
    assert env["SWITCHYARD_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "admin-key"


def test_without_the_tool_service_the_gateway_has_no_tools(chart: helm.Chart) -> None:
    objects = render(chart, MATRIX["tools-off"])
    assert not [o for o in objects if o["metadata"]["name"].endswith("-tools")]
    assert "tool_service_address" not in config(objects)["gateway"]


def test_disaggregation_renders_a_prefill_and_a_decode_deployment_the_controller_follows(
    chart: helm.Chart,
) -> None:
    objects = render(chart, MATRIX["disaggregated"])
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    assert f"{RELEASE}-switchyard-engine" not in deployments
    controller = config(objects)["controller"]
    assert controller["engine_deployment"] == ""
    for role, replicas in (("prefill", 2), ("decode", 3)):
        deployment = one(objects, "Deployment", f"{RELEASE}-switchyard-engine-{role}")
        assert deployment["spec"]["replicas"] == replicas
        assert controller[f"{role}_engine_deployment"] == deployment["metadata"]["name"]
        # The pool's selector (the controller adds the role to engine_selector) finds exactly
        # this Deployment's pods, and the Deployment's own selector tells them apart.
        selector = dict(
            term.split("=")
            for term in f"{controller['engine_selector']},switchyard.dev/role={role}".split(",")
        )
        template = deployment["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        assert deployment["spec"]["selector"]["matchLabels"]["switchyard.dev/role"] == role
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env["SWITCHYARD_ROLE"] == role
    # One headless Service and one disruption budget cover both pools' pods.
    service = one(objects, "Service", f"{RELEASE}-switchyard-engine")
    assert "switchyard.dev/role" not in service["spec"]["selector"]


def test_without_disaggregation_there_is_one_engine_deployment(chart: helm.Chart) -> None:
    objects = render(chart, {"engine": {"replicas": 2}})
    engines = [
        o for o in objects if o["kind"] == "Deployment" and "engine" in o["metadata"]["name"]
    ]
    assert [o["metadata"]["name"] for o in engines] == [f"{RELEASE}-switchyard-engine"]
    assert engines[0]["spec"]["replicas"] == 2
    env = {e["name"] for e in engines[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "SWITCHYARD_ROLE" not in env
    controller = config(objects)["controller"]
    assert "prefill_engine_deployment" not in controller
