"""The kustomizations render, validate against Kubernetes' schemas and agree with the guard."""

from __future__ import annotations

import base64
import copy
import re
from typing import Any

import pytest
import yaml

from guard_server.config.schema import GuardConfig, PolicyFile, SamplingPolicy
from tests.deploy.toolchain import DEPLOY, KUSTOMIZATIONS, REPO, config_files, find, missing

# the current release, and the oldest one deploy/README.md promises
KUBERNETES_VERSIONS = ["1.37.0", "1.30.0"]
OVERLAYS = ["overlays/dev", "overlays/prod"]
# Kinds from CRDs (prometheus-operator) that the Kubernetes schemas do not know.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
GUARD_DRAIN_S = 60  # aiohttp's shutdown timeout: in-flight requests get this long after SIGTERM


def _guard_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(objects, "Deployment", "guard")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _vllm_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(objects, "Deployment", "vllm")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _flags(container: dict[str, Any]) -> dict[str, str]:
    """``--name=value`` and ``--name value`` arguments of a container, by name."""
    args = [*container.get("command", []), *container.get("args", [])]
    flags: dict[str, str] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        flags[name] = value
    return flags


def _restricted_violations(workload: dict[str, Any]) -> list[str]:
    """What breaks the `restricted` Pod Security Standard in a workload's pod template."""
    pod = workload["spec"]["template"]["spec"]
    pod_security = pod.get("securityContext", {})
    problems = [f"pod sets {key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    problems += [f"hostPath {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        security = container.get("securityContext", {})

        def setting(key: str, security: dict[str, Any] = security) -> Any:
            return security.get(key, pod_security.get(key))

        name = container["name"]
        if setting("runAsNonRoot") is not True or setting("runAsUser") == 0:
            problems.append(f"{name} may run as root")
        if security.get("allowPrivilegeEscalation") is not False or security.get("privileged"):
            problems.append(f"{name} may escalate privileges")
        if security.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name} keeps capabilities")
        if (setting("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name} has no RuntimeDefault seccomp profile")
    return problems


def _check_monitoring_object(obj: dict[str, Any]) -> None:
    """The structure of a ServiceMonitor or PrometheusRule, which no bundled schema covers."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert set(spec) == {"selector", "endpoints"}
        assert spec["selector"]["matchLabels"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels"}
            assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
    else:
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert set(group) <= {"name", "interval", "rules"} and group["rules"]
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule) and isinstance(rule["expr"], str)
                assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str, version: str
) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed")
    objects = rendered[kustomization]
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            _check_monitoring_object(obj)
            continue
        # strict: unknown fields (typos) are errors, not silently dropped by the API server
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_guard_pod_is_hardened_probed_and_drains(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    pod = find(rendered[overlay], "Deployment", "guard")["spec"]["template"]["spec"]
    container = _guard_container(rendered[overlay])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert "cpu" in container["resources"]["requests"]
    assert "memory" in container["resources"]["limits"]
    # endpoints drop the pod during preStop, then the guard drains for up to 60 s
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + GUARD_DRAIN_S + 5
    assert container["args"] == [
        "serve", "--config", "/etc/guard/guard.yaml", "--host", "0.0.0.0", "--port", "8080",
    ]  # fmt: skip
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "subPath" not in mounts["/etc/guard"], "subPath mounts never see ConfigMap updates"
    # policy changes are applied in place and reloaded live, not rolled out under new names
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts["/etc/guard"]["name"]]
    sources = {
        next(iter(s)): next(iter(s.values()))["name"] for s in volume["projected"]["sources"]
    }
    assert sources == {"configMap": "guard-config", "secret": "guard-clients"}
    names = {
        o["metadata"]["name"] for o in rendered[overlay] if o["kind"] in ("ConfigMap", "Secret")
    }
    assert {"guard-config", "guard-clients"} <= names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_their_namespace_pod_security_level(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    (namespace,) = [o for o in objects if o["kind"] == "Namespace"]
    level = namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    for workload in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet")):
        problems = _restricted_violations(workload)
        if workload["metadata"]["name"] == "vllm" and level == "baseline":
            # the upstream vLLM image runs as root: baseline allows that, and nothing else
            assert all(p.endswith("may run as root") for p in problems), problems
        else:
            assert problems == [], (workload["metadata"]["name"], problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_guard_config_matches_the_manifests(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    config = yaml.safe_load(config_files(objects)["guard.yaml"])
    container = _guard_container(objects)
    # the server secret: the env var guard.yaml names comes from a Secret
    env = {e["name"]: e for e in container["env"]}
    secret_ref = env[config["secret"]["env"]]["valueFrom"]["secretKeyRef"]
    assert secret_ref["key"] == config["secret"]["env"]
    # each upstream URL is a Service port of this deployment, served by vLLM under that name
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    vllm = _flags(_vllm_container(objects))
    for model, upstream in config["upstreams"].items():
        assert upstream.get("served_model", model) == vllm["served-model-name"]
        for url in upstream["urls"]:
            host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url).groups()
            assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
    # more than one guard replica needs shared state, or every limit is multiplied
    hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    replicas = find(objects, "Deployment", "guard")["spec"].get("replicas", 1)
    if hpas or replicas > 1:
        assert config["state"]["backend"] == "redis"
        url = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", config["state"]["redis_url"])
        host, port = url.groups()
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
    else:
        assert replicas == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vllm_max_logprobs_covers_every_tier_and_loads_the_plugin(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    files = config_files(objects)
    tiers = PolicyFile.model_validate(yaml.safe_load(files["tiers.yaml"])).tiers
    largest = 0
    for tier in tiers.values():
        largest = max(largest, tier.logprobs.max_top)
        for field in ("logprobs", "top_logprobs", "prompt_logprobs"):
            bound = tier.bounds.get(field)
            largest = max(largest, int(bound.max or 0) if bound else 0)
    container = _vllm_container(objects)
    flags = _flags(container)
    assert int(flags["max-logprobs"]) >= largest
    assert flags["logits-processors"] == "guard_server.vllm_plugin:GuardLogitsProcessor"
    # a V1-interface processor: Model Runner V2 (vLLM's CUDA default) would reject it
    assert {"name": "VLLM_USE_V2_MODEL_RUNNER", "value": "0"} in container["env"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus is None) == (overlay == "overlays/dev")


def test_prod_vllm_requests_a_gpu_and_gets_the_plugin_from_the_guard_image(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["overlays/prod"]
    pod = find(objects, "Deployment", "vllm")["spec"]["template"]["spec"]
    container = _vllm_container(objects)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    (init,) = pod["initContainers"]
    assert init["image"] == _guard_container(objects)["image"]
    plugin_dir = next(m["mountPath"] for m in init["volumeMounts"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PYTHONPATH"] == plugin_dir
    assert f"'{plugin_dir}/guard_server'" in init["command"][-1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_guard_reaches_vllm_and_redis(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    policies: dict[str, list[Any]] = {}
    for obj in objects:
        if obj["kind"] == "NetworkPolicy" and "Ingress" in obj["spec"]["policyTypes"]:
            app = obj["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            policies.setdefault(app, []).append(obj["spec"].get("ingress", []))
    guard_only = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "guard-server"}}}]
    backends = {"vllm": 8000, "redis": 6379}
    apps = {
        o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }
    for app, port in backends.items():
        if app not in apps:
            continue
        (rules,) = policies[app]
        assert rules == [{"from": guard_only, "ports": [{"port": port, "protocol": "TCP"}]}]
    (guard_rules,) = policies["guard-server"]
    api, metrics = guard_rules
    assert api == {"ports": [{"port": 8080, "protocol": "TCP"}]}  # clients: the API port only
    assert metrics["ports"] == [{"port": 9464, "protocol": "TCP"}]
    assert [set(peer) for peer in metrics["from"]] == [{"namespaceSelector"}]  # Prometheus'


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_metrics_have_their_own_port_and_the_api_port_serves_none(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    objects = rendered[kustomization]
    config = yaml.safe_load(config_files(objects)["guard.yaml"])
    ports = {p["name"]: p["containerPort"] for p in _guard_container(objects)["ports"]}
    assert config["metrics"]["port"] == ports["metrics"] != ports["http"]
    assert config["server"]["port"] == ports["http"]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    assert [p["targetPort"] for p in services["guard"]["spec"]["ports"]] == ["http"]
    metrics = services["guard-metrics"]
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["metrics"]
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_services_and_monitors_select_real_pods_and_ports(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    objects = rendered[kustomization]
    pods = [o["spec"]["template"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        (pod,) = [p for p in pods if selector <= p["metadata"]["labels"].items()]
        port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"].items()
        services = [o for o in objects if o["kind"] == "Service"]
        (service,) = [s for s in services if selector <= s["metadata"]["labels"].items()]
        names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in names and endpoint["path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_disruption_budget_and_autoscaler_target_the_guard(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    labels = find(objects, "Deployment", "guard")["spec"]["template"]["metadata"]["labels"]
    pdb = find(objects, "PodDisruptionBudget", "guard")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "guard",
        }  # fmt: skip
        assert hpa["spec"]["minReplicas"] >= 2
        assert "replicas" not in find(objects, "Deployment", "guard")["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_plain_api_key_is_deployed(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    clients = yaml.safe_load(config_files(objects)["clients.yaml"]).get("clients") or {}
    for client in clients.values():
        for key in client["keys"]:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", key)
    text = yaml.safe_dump_all(objects)
    decoded = [
        base64.b64decode(v).decode()
        for o in objects
        if o["kind"] == "Secret"
        for v in o.get("data", {}).values()
    ]
    for blob in (text, *decoded):
        assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", blob), "a plain API key is deployed"


def test_prod_commits_no_server_secret_and_pins_every_image(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["overlays/prod"]
    secrets = [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"]
    for created_in_the_cluster in ("guard-secret", "vllm-api-key", "redis-auth"):
        assert not [name for name in secrets if name.startswith(created_in_the_cluster)]
    images = [
        c["image"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
        for c in [*o["spec"]["template"]["spec"].get("initContainers", []),
                  *o["spec"]["template"]["spec"]["containers"]]
    ]  # fmt: skip
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image


def test_base_tiers_are_the_repository_default_policy_plus_sampling() -> None:
    deployed = yaml.safe_load((DEPLOY / "base" / "config" / "tiers.yaml").read_text())
    default = yaml.safe_load((REPO / "policies" / "default.yaml").read_text())
    sampling = {name: tier.pop("sampling", None) for name, tier in deployed["tiers"].items()}
    assert deployed == default, (
        "deploy/base/config/tiers.yaml must be policies/default.yaml plus `sampling:` sections"
    )
    assert all(sampling.values()), "every deployed tier says what the plugin does to it"


PLUGIN = "guard_server.vllm_plugin:GuardLogitsProcessor"


def _sampling_active(sampling: SamplingPolicy) -> bool:
    bounds = sampling.bounds.model_dump().values()
    return (
        sampling.noise.sigma > 0
        or sampling.watermark.enabled
        or any(value is not None for value in bounds)
    )


def plugin_use_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Where vLLM loads the guard's plugin but the guard's config leaves it unused: an
    upstream not marked ``guard_plugin: true``, or no tier calling it with a ``sampling:``
    control; and the reverse, ``guard_plugin: true`` towards a vLLM without the plugin."""
    loaded = _flags(_vllm_container(objects)).get("logits-processors") == PLUGIN
    files = config_files(objects)
    config = GuardConfig.model_validate(yaml.safe_load(files["guard.yaml"]))
    tiers: dict[str, Any] = {}
    for name in config.policies:
        tiers.update(PolicyFile.model_validate(yaml.safe_load(files[name])).tiers)
    problems = []
    for model, upstream in config.upstreams.items():
        if upstream.guard_plugin and not loaded:
            problems.append(f"{model}: guard_plugin is true but vLLM does not load the plugin")
        if not loaded:
            continue
        if not upstream.guard_plugin:
            problems.append(f"{model}: vLLM loads the plugin but guard_plugin is not true")
        callers = [t for t in tiers.values() if "*" in t.models or model in t.models]
        if not any(_sampling_active(tier.sampling) for tier in callers):
            problems.append(f"{model}: vLLM loads the plugin but no tier has a `sampling:` control")
    return problems


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_plugin_vllm_loads_is_used_by_the_guard(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    objects = rendered[kustomization]
    assert _flags(_vllm_container(objects))["logits-processors"] == PLUGIN
    assert plugin_use_problems(objects) == []


def test_a_loaded_but_unused_plugin_is_caught(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def edited(file: str, old: str, new: str) -> list[dict[str, Any]]:
        objects = copy.deepcopy(rendered["overlays/prod"])
        data = find(objects, "ConfigMap", "guard-config")["data"]
        assert old in data[file]
        data[file] = data[file].replace(old, new)
        return objects

    unmarked = edited("guard.yaml", "guard_plugin: true", "guard_plugin: false")
    assert plugin_use_problems(unmarked) == [
        "qwen3-8b: vLLM loads the plugin but guard_plugin is not true"
    ]
    unused = edited("tiers.yaml", "enabled: true", "enabled: false")
    assert plugin_use_problems(unused) == [
        "qwen3-8b: vLLM loads the plugin but no tier has a `sampling:` control"
    ]
    unloaded = copy.deepcopy(rendered["overlays/prod"])
    container = _vllm_container(unloaded)
    container["args"] = [a for a in container["args"] if not a.startswith("--logits-processors")]
    assert plugin_use_problems(unloaded) == [
        "qwen3-8b: guard_plugin is true but vLLM does not load the plugin"
    ]


def _secret_ref(container: dict[str, Any], name: str) -> tuple[str, str]:
    (entry,) = [e for e in container.get("env", []) if e["name"] == name]
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vllm_key_and_redis_password_come_from_secrets_both_sides_share(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    config = GuardConfig.model_validate(yaml.safe_load(config_files(objects)["guard.yaml"]))
    guard = _guard_container(objects)
    vllm = _vllm_container(objects)
    for upstream in config.upstreams.values():
        # vLLM requires the key (VLLM_API_KEY is its --api-key) the guard reads from the env
        # var its config names; both from one Secret, never from a plain value
        assert upstream.api_key is not None and upstream.api_key.env is not None
        assert _secret_ref(guard, upstream.api_key.env) == _secret_ref(vllm, "VLLM_API_KEY")
    assert "api-key" not in " ".join(_flags(vllm))  # a flag would put the key in the pod spec
    if config.state.backend != "redis":
        return
    password = config.state.redis_password
    assert password is not None and password.env is not None
    redis = find(objects, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    secret = _secret_ref(guard, password.env)
    assert _secret_ref(redis, "REDIS_PASSWORD") == secret == _secret_ref(redis, "REDISCLI_AUTH")
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"  # the kubelet expands it
    assert "redis-cli" in " ".join(redis["readinessProbe"]["exec"]["command"])


def test_prometheus_rule_embeds_the_rules_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "guard-rules.yaml").read_text())
    rule = find(rendered["overlays/prod"], "PrometheusRule", "guard-server")
    assert rule["spec"]["groups"] == rules["groups"], (
        "run `python deploy/prometheus/render_prometheusrule.py`"
    )
