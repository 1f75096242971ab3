"""Unit tests of the deployment files: Dockerfile, docker-compose.yml and the Helm chart.

No network and no Docker: the compose file is read with PyYAML, and the chart is rendered with the
helm binary when one is installed (scripts/install-helm.sh), else those tests are skipped.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from vecpipe.cli.main import build_parser
from vecpipe.config import KAFKA_PASSTHROUGH_PREFIX, env_var_names, load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
CHART = ROOT / "helm" / "vecpipe"
STAGES = ("embed", "write")
KEDA_GPU = ("keda.enabled=true", "embed.gpu.enabled=true")

Manifest = dict[str, Any]


def _unknown_settings(names: list[str]) -> list[str]:
    """The VECPIPE_* names among ``names`` that vecpipe.config does not read."""
    known = env_var_names()
    return sorted(
        n for n in names
        if n.startswith("VECPIPE_") and n not in known
        and not n.startswith(KAFKA_PASSTHROUGH_PREFIX)
    )


def _parses(args: list[str]) -> bool:
    """Whether ``vecpipe ARGS`` is a valid command line."""
    try:
        build_parser().parse_args(args)
    except SystemExit:
        return False
    return True


# -- Dockerfile -------------------------------------------------------------------------------

def _dockerfile() -> str:
    # Continuation lines joined, so that each instruction is one line.
    return DOCKERFILE.read_text().replace("\\\n", " ")


def test_dockerfile_runs_as_uid_10001() -> None:
    """The image's final USER is the numeric non-root uid 10001 (runAsNonRoot can check it)."""
    users = re.findall(r"^USER\s+(\S+)", _dockerfile(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    assert users[-1].split(":")[0] == "10001"


def test_dockerfile_has_cpu_and_cuda_variants() -> None:
    """ARG VARIANT defaults to cpu and selects a base stage per variant, cuda on nvidia/cuda."""
    text = _dockerfile()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE)
    assert re.search(r"^FROM \S+ AS base-cpu$", text, re.MULTILINE)
    assert re.search(r"^FROM \S+ AS base-cuda$", text, re.MULTILINE)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text, re.MULTILINE)
    assert re.search(r"^FROM base-\$\{VARIANT\} AS base$", text, re.MULTILINE)


def test_dockerfile_entrypoint_port_and_offline_model() -> None:
    """The image runs `vecpipe`, exposes the metrics port 9100 and never fetches model weights."""
    text = _dockerfile()
    assert re.search(r'^ENTRYPOINT \["vecpipe"\]$', text, re.MULTILINE)
    assert re.search(r"^EXPOSE 9100$", text, re.MULTILINE)
    assert "HF_HUB_OFFLINE=1" in text
    assert "pip install ." in text


def test_dockerfile_sets_only_settings_the_code_reads() -> None:
    """Every VECPIPE_* variable the Dockerfile sets is one vecpipe/config.py reads."""
    names = re.findall(r"\b(VECPIPE_[A-Z0-9_]+)=", _dockerfile())
    assert names
    assert _unknown_settings(names) == []


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    """Every path the build stage copies from the context is re-included by .dockerignore."""
    kept = {line.strip()[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip().startswith("!")}
    copied: list[str] = []
    for line in _dockerfile().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied += [p.rstrip("/") for p in line.split()[1:-1]]
    assert copied
    assert sorted(set(copied) - kept) == []


# -- docker-compose.yml ---------------------------------------------------------------------------

@functools.cache
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _vecpipe_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _services().items() if "build" in s}


def test_compose_services_and_images() -> None:
    """Compose runs Kafka 4.1.1, pgvector on PostgreSQL 18 and the migrate, embed, write jobs."""
    services = _services()
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["postgres"]["image"] == "pgvector/pgvector:pg18"
    assert {"migrate", "embed", "write"} <= set(_vecpipe_services())
    assert "healthcheck" in services["kafka"]
    assert "healthcheck" in services["postgres"]
    volume = services["postgres"]["volumes"][0].split(":")[0]
    assert volume in _compose()["volumes"]


def test_compose_kafka_is_single_node_kraft() -> None:
    """The broker is its own controller and advertises the address the workers bootstrap from."""
    kafka = _environment(_services()["kafka"])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(kafka["KAFKA_NODE_ID"] + "@")
    assert kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert kafka["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    listener_names = {pair.split(":")[0]
                      for pair in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")}
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] in listener_names
    advertised = {entry.split("://", 1)[1] for entry in
                  kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for name, service in _vecpipe_services().items():
        bootstrap = _environment(service).get("VECPIPE_KAFKA_BOOTSTRAP")
        assert bootstrap in advertised, f"{name} bootstraps from {bootstrap}"


def test_compose_sets_only_settings_the_code_reads() -> None:
    """Every VECPIPE_* variable in docker-compose.yml is one vecpipe/config.py reads."""
    names = [n for s in _services().values() for n in _environment(s)]
    assert "VECPIPE_DATABASE_URL" in names
    assert _unknown_settings(names) == []


def test_compose_settings_are_valid_configuration() -> None:
    """Each vecpipe service's environment loads as a valid configuration."""
    for name, service in _vecpipe_services().items():
        cfg = load_config(environ=_environment(service))
        assert cfg.ops.metrics_port == 9100, name
        assert cfg.ops.log_format == "json", name
        assert cfg.kafka.bootstrap == "kafka:19092", name


def test_compose_commands_are_subcommands() -> None:
    """The command of every vecpipe service is a real `vecpipe` subcommand line."""
    commands = {name: s["command"] for name, s in _vecpipe_services().items()}
    assert commands["migrate"] == ["migrate"]
    assert commands["embed"] == ["embed"]
    assert commands["write"] == ["write"]
    for name, command in commands.items():
        args = shlex.split(command) if isinstance(command, str) else list(command)
        assert _parses(args), f"{name}: vecpipe {' '.join(args)}"


def test_compose_start_order() -> None:
    """Workers start after a healthy broker and database and a migrate that exited 0."""
    services = _services()
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for stage in STAGES:
        deps = services[stage]["depends_on"]
        assert deps["kafka"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["migrate"]["condition"] == "service_completed_successfully"


def test_compose_workers_publish_metrics_and_drain() -> None:
    """Workers publish their metrics port and get longer than the shutdown grace to stop."""
    for stage in STAGES:
        service = _services()[stage]
        env = _environment(service)
        targets = [str(p).rsplit(":", 1)[1] for p in service["ports"]]
        assert env["VECPIPE_METRICS_PORT"] in targets
        grace = float(env["VECPIPE_OPS_SHUTDOWN_GRACE_S"])
        assert float(service["stop_grace_period"].rstrip("s")) > grace


# -- Helm chart ----------------------------------------------------------------------------------

def _find_helm() -> str | None:
    if os.environ.get("VECPIPE_HELM"):
        return os.environ["VECPIPE_HELM"]
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    tools = Path(os.environ.get("VECPIPE_TOOLS") or Path.home() / ".cache" / "vecpipe" / "tools")
    cached = tools / "bin" / "helm"
    return str(cached) if os.access(cached, os.X_OK) else None


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The helm binary, with its config and cache in a temporary folder."""
    found = _find_helm()
    if found is None:
        pytest.skip("helm not found (VECPIPE_HELM, PATH or the tools cache); "
                    "install it with scripts/install-helm.sh")
    home = tmp_path_factory.mktemp("helm")
    with pytest.MonkeyPatch.context() as patch:
        for key in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            patch.setenv(key, str(home / key.lower()))
        yield found


def _helm(helm: str, *args: str) -> str:
    done = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


@functools.cache
def _render(helm: str, *sets: str) -> tuple[Manifest, ...]:
    args = ["template", "vecpipe", str(CHART)]
    for s in sets:
        args += ["--set", s]
    docs = yaml.safe_load_all(_helm(helm, *args))
    return tuple(d for d in docs if isinstance(d, dict))


def _of_kind(manifests: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def _pods(manifests: tuple[Manifest, ...]) -> list[Manifest]:
    """The pod specs of every Deployment and Job."""
    return [m["spec"]["template"]["spec"] for m in manifests if m["kind"] in ("Deployment", "Job")]


def _configmap(manifests: tuple[Manifest, ...]) -> dict[str, str]:
    (cm,) = _of_kind(manifests, "ConfigMap")
    data = cm["data"]
    assert isinstance(data, dict)
    return data


def _deployment(manifests: tuple[Manifest, ...], stage: str) -> Manifest:
    (deployment,) = [m for m in _of_kind(manifests, "Deployment")
                     if m["metadata"]["labels"]["app.kubernetes.io/component"] == stage]
    return deployment


@pytest.mark.parametrize("sets", [(), KEDA_GPU], ids=["defaults", "keda-gpu"])
def test_helm_lint(helm: str, sets: tuple[str, ...]) -> None:
    """`helm lint --strict` passes with the default values and with KEDA and GPU enabled."""
    args = ["lint", "--strict", str(CHART)]
    for s in sets:
        args += ["--set", s]
    _helm(helm, *args)


def test_helm_default_kinds(helm: str) -> None:
    """Defaults render two Deployments, the migrate Job, a ConfigMap, and per stage a metrics
    Service, a PodDisruptionBudget and an HPA; no Secret and no ScaledObject."""
    kinds = Counter(m["kind"] for m in _render(helm))
    assert kinds["Deployment"] == 2
    assert kinds["Job"] == 1
    assert kinds["ConfigMap"] == 1
    assert kinds["Service"] == 2
    assert kinds["PodDisruptionBudget"] == 2
    assert kinds["HorizontalPodAutoscaler"] == 2
    assert kinds["ScaledObject"] == 0
    assert kinds["Secret"] == 0


def test_helm_keda_replaces_hpa(helm: str) -> None:
    """With keda.enabled each stage gets a Kafka-lag ScaledObject instead of an HPA."""
    manifests = _render(helm, *KEDA_GPU)
    assert _of_kind(manifests, "HorizontalPodAutoscaler") == []
    scaled = _of_kind(manifests, "ScaledObject")
    assert len(scaled) == 2
    targets = {s["spec"]["scaleTargetRef"]["name"] for s in scaled}
    assert targets == {d["metadata"]["name"] for d in _of_kind(manifests, "Deployment")}
    for s in scaled:
        (trigger,) = s["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        assert int(trigger["metadata"]["lagThreshold"]) > 0


@pytest.mark.parametrize("sets", [(), ("kafka.partitions=3", "embed.autoscaling.maxReplicas=8")],
                         ids=["defaults", "few-partitions"])
def test_helm_replicas_capped_at_partitions(helm: str, sets: tuple[str, ...]) -> None:
    """KEDA maxReplicaCount and HPA maxReplicas never exceed the topic's partition count."""
    for autoscaler in ("keda.enabled=true", "keda.enabled=false"):
        manifests = _render(helm, autoscaler, *sets)
        partitions = int(_configmap(manifests)["VECPIPE_KAFKA_PARTITIONS"])
        caps = [m["spec"]["maxReplicaCount"] for m in _of_kind(manifests, "ScaledObject")]
        caps += [m["spec"]["maxReplicas"] for m in _of_kind(manifests, "HorizontalPodAutoscaler")]
        assert len(caps) == 2
        assert all(cap <= partitions for cap in caps), (caps, partitions)
    if sets:
        assert partitions == 3


@pytest.mark.parametrize("sets", [(), KEDA_GPU], ids=["defaults", "keda-gpu"])
def test_helm_workers_probe_health_endpoints(helm: str, sets: tuple[str, ...]) -> None:
    """Workers run `vecpipe embed` / `vecpipe write`, live on /healthz and are ready on /readyz
    at the metrics port, which their Service exposes with Prometheus scrape annotations."""
    manifests = _render(helm, *sets)
    port = int(_configmap(manifests)["VECPIPE_METRICS_PORT"])
    for stage in STAGES:
        (container,) = _deployment(manifests, stage)["spec"]["template"]["spec"]["containers"]
        assert container["args"] == [stage]
        assert _parses(container["args"])
        (named,) = container["ports"]
        assert named["containerPort"] == port
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": named["name"]}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": named["name"]}
    for service in _of_kind(manifests, "Service"):
        notes = service["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == port
        assert service["spec"]["ports"][0]["port"] == port


@pytest.mark.parametrize("sets", [(), KEDA_GPU], ids=["defaults", "keda-gpu"])
def test_helm_pods_are_non_root_with_read_only_root(helm: str, sets: tuple[str, ...]) -> None:
    """Every pod runs as uid 10001 on a read-only root filesystem, without privilege escalation
    or capabilities, with writable emptyDirs at /tmp and the model cache."""
    manifests = _render(helm, *sets)
    pods = _pods(manifests)
    assert len(pods) == 3
    model_cache = _configmap(manifests)["VECPIPE_MODEL_CACHE_DIR"]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["automountServiceAccountToken"] is False
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/tmp"] in empty_dirs
            assert any(model_cache.startswith(path + "/") and name in empty_dirs
                       for path, name in mounts.items())


def test_helm_termination_grace_exceeds_shutdown_grace(helm: str) -> None:
    """Kubernetes waits longer than VECPIPE_OPS_SHUTDOWN_GRACE_S before it kills a worker."""
    manifests = _render(helm)
    grace = float(_configmap(manifests)["VECPIPE_OPS_SHUTDOWN_GRACE_S"])
    for stage in STAGES:
        pod = _deployment(manifests, stage)["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > grace


SASL = ("kafka.sasl.enabled=true", "kafka.sasl.existingSecret=kafka-credentials",
        "kafka.client.security\\.protocol=SASL_SSL",
        "kafka.client.sasl\\.mechanism=SCRAM-SHA-512", "keda.enabled=true")


@pytest.mark.parametrize("sets", [(), KEDA_GPU, SASL], ids=["defaults", "keda-gpu", "sasl"])
def test_helm_sets_only_settings_the_code_reads(helm: str, sets: tuple[str, ...]) -> None:
    """Every env name and ConfigMap key the chart sets is a VECPIPE_* setting the code reads."""
    manifests = _render(helm, *sets)
    names = list(_configmap(manifests))
    for pod in _pods(manifests):
        for container in pod["containers"]:
            names += [e["name"] for e in container.get("env", [])]
    assert all(n.startswith("VECPIPE_") for n in names), names
    assert _unknown_settings(names) == []


def test_helm_secrets_come_from_existing_secrets(helm: str) -> None:
    """The database URL and the SASL credentials are secretKeyRefs, never inline values; the
    pass-through librdkafka settings and the rest of the ConfigMap load as a valid config."""
    manifests = _render(helm, *SASL)
    assert _of_kind(manifests, "Secret") == []
    for pod in _pods(manifests):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            for name in ("VECPIPE_DATABASE_URL", "VECPIPE_KAFKA__SASL_USERNAME",
                         "VECPIPE_KAFKA__SASL_PASSWORD"):
                assert "value" not in env[name]
                assert env[name]["valueFrom"]["secretKeyRef"]["name"]
    environ = dict(_configmap(manifests), VECPIPE_DATABASE_URL="postgresql://u:p@db/vecpipe")
    cfg = load_config(environ=environ)
    assert cfg.kafka.client["security.protocol"] == "SASL_SSL"
    assert cfg.kafka.client["sasl.mechanism"] == "SCRAM-SHA-512"
    (auth,) = _of_kind(manifests, "TriggerAuthentication")
    assert {r["name"] for r in auth["spec"]["secretTargetRef"]} == {"kafka-credentials"}


def test_helm_migrate_job_is_a_pre_install_hook(helm: str) -> None:
    """`vecpipe migrate` runs as a pre-install/pre-upgrade hook Job that is cleaned up."""
    (job,) = _of_kind(_render(helm), "Job")
    notes = job["metadata"]["annotations"]
    assert set(notes["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "hook-succeeded" in notes["helm.sh/hook-delete-policy"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "migrate"
    assert _parses(container["args"])


def test_helm_gpu_embed(helm: str) -> None:
    """embed.gpu.enabled gives the embed worker the CUDA image, device cuda, a GPU limit and
    the GPU nodes' selector and toleration; the writer stays on CPU."""
    manifests = _render(helm, *KEDA_GPU)
    pod = _deployment(manifests, "embed")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].endswith("-cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VECPIPE_DEVICE"] == "cuda"
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    write = _deployment(manifests, "write")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in write["containers"][0]["resources"].get("limits", {})
    default = _deployment(_render(helm), "embed")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in default["containers"][0]["resources"].get("limits", {})
    assert "tolerations" not in default


# -- Monitoring: the dashboard and the alert rules, in compose and in the chart -------------------

FILES = CHART / "files"
DASHBOARD = FILES / "vecpipe-dashboard.json"
ALERTS = FILES / "vecpipe-alerts.yml"
MONITORING_ON = ("monitoring.dashboard.enabled=true", "monitoring.prometheusRule.enabled=true",
                 "monitoring.serviceMonitor.enabled=true")


def _mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts (each must exist)."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            host = (ROOT / source).resolve()
            assert host.exists(), f"compose mounts {source}, which does not exist"
            mounts[target] = host
    return mounts


def _alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _worker_job_pattern() -> str:
    """The job regex by which the alert rules select the workers' targets."""
    (expr,) = [r["expr"] for r in _alert_rules() if r.get("alert") == "VecpipeTargetDown"]
    found = re.search(r'up\{job=~"([^"]+)"\}', expr)
    assert found, expr
    return found.group(1)


def test_compose_prometheus_scrapes_the_workers_and_loads_the_rules() -> None:
    """Compose's Prometheus loads the chart's rules file and scrapes each worker's metrics port
    under the job name the rules select (vecpipe-<stage>)."""
    services = _services()
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:v2.")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    mounts = _mounts(prometheus)
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    rules = [mounts[str(Path("/etc/prometheus") / f)] for f in config["rule_files"]]
    assert rules == [ALERTS.resolve()]
    jobs = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
            for job in config["scrape_configs"]}
    for stage in STAGES:
        port = _environment(services[stage])["VECPIPE_METRICS_PORT"]
        assert jobs[f"vecpipe-{stage}"] == [f"{stage}:{port}"]
        assert re.fullmatch(_worker_job_pattern(), f"vecpipe-{stage}")
    assert "9090:9090" in prometheus["ports"]


def test_compose_grafana_provisions_prometheus_and_the_dashboard() -> None:
    """Compose's Grafana has compose's Prometheus as its default data source and loads the
    chart's dashboard file from the folder its dashboard provider reads."""
    grafana = _services()["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    mounts = _mounts(grafana)
    datasources = [yaml.safe_load(host.read_text()) for target, host in mounts.items()
                   if target.startswith("/etc/grafana/provisioning/datasources/")]
    (source,) = [d for f in datasources for d in f["datasources"]]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    providers = [yaml.safe_load(host.read_text()) for target, host in mounts.items()
                 if target.startswith("/etc/grafana/provisioning/dashboards/")]
    (provider,) = [p for f in providers for p in f["providers"]]
    folder = provider["options"]["path"].rstrip("/")
    dashboards = [host for target, host in mounts.items() if target.startswith(folder + "/")]
    assert dashboards == [DASHBOARD.resolve()]
    # The panels take their data source from a variable, which the default one fills.
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes label selector selects ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        holds = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
                 "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not holds:
            return False
    return True


def _dashboard_configmaps(manifests: tuple[Manifest, ...], label: str = "grafana_dashboard",
                          value: str = "1") -> list[Manifest]:
    return [m for m in _of_kind(manifests, "ConfigMap")
            if m["metadata"]["labels"].get(label) == value]


def test_helm_monitoring_is_off_by_default(helm: str) -> None:
    """By default the chart renders no dashboard ConfigMap, PrometheusRule or ServiceMonitor;
    each value renders its own object only."""
    manifests = _render(helm)
    assert _dashboard_configmaps(manifests) == []
    assert _of_kind(manifests, "PrometheusRule") == []
    assert _of_kind(manifests, "ServiceMonitor") == []
    for one, kind in zip(MONITORING_ON, ("ConfigMap", "PrometheusRule", "ServiceMonitor"),
                         strict=True):
        extra = Counter(m["kind"] for m in _render(helm, one)) - Counter(m["kind"]
                                                                          for m in manifests)
        assert extra == Counter({kind: 1}), one


def test_helm_lint_with_monitoring(helm: str) -> None:
    """`helm lint --strict` passes with the dashboard, the rules and the ServiceMonitor on."""
    args = ["lint", "--strict", str(CHART)]
    for s in MONITORING_ON:
        args += ["--set", s]
    _helm(helm, *args)


def test_helm_dashboard_configmap_is_the_dashboard_file(helm: str) -> None:
    """The dashboard ConfigMap holds the dashboard file's JSON, labelled for Grafana's sidecar;
    the label, its value and the namespace are values."""
    (cm,) = _dashboard_configmaps(_render(helm, "monitoring.dashboard.enabled=true"))
    (text,) = cm["data"].values()
    assert json.loads(text) == json.loads(DASHBOARD.read_text())
    custom = _render(helm, "monitoring.dashboard.enabled=true",
                     "monitoring.dashboard.label=dash", "monitoring.dashboard.labelValue=yes",
                     "monitoring.dashboard.namespace=grafana",
                     "monitoring.dashboard.annotations.grafana_folder=vecpipe")
    (cm,) = _dashboard_configmaps(custom, "dash", "yes")
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "vecpipe"}


def test_helm_prometheus_rule_is_the_rules_file(helm: str) -> None:
    """The PrometheusRule's groups are the rules file's, with the Prometheus' selector labels."""
    manifests = _render(helm, "monitoring.prometheusRule.enabled=true",
                        "monitoring.prometheusRule.labels.release=kube-prometheus-stack")
    (rule,) = _of_kind(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


def test_helm_prometheus_rule_runbook_base_url(helm: str) -> None:
    """monitoring.runbookBaseUrl moves every runbook link to that base, keeping its anchor, and
    changes nothing else."""
    base = "https://wiki.example.com/vecpipe"
    manifests = _render(helm, "monitoring.prometheusRule.enabled=true",
                        f"monitoring.runbookBaseUrl={base}/")
    (rule,) = _of_kind(manifests, "PrometheusRule")
    got = copy.deepcopy([r for g in rule["spec"]["groups"] for r in g["rules"]])
    want = _alert_rules()
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        url, original = mine["annotations"].pop("runbook_url"), theirs["annotations"].pop(
            "runbook_url")
        assert url == f"{base}#{original.partition('#')[2]}"
        assert mine == theirs


def test_helm_service_monitor_scrapes_the_metrics_services(helm: str) -> None:
    """The ServiceMonitor selects exactly the stages' metrics Services in the release's
    namespace, scrapes their metrics port and names their jobs as the alert rules select them."""
    manifests = _render(helm, "monitoring.serviceMonitor.enabled=true",
                        "monitoring.serviceMonitor.interval=15s")
    (monitor,) = _of_kind(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["default"]}
    services = _of_kind(manifests, "Service")
    assert len(services) == len(STAGES)
    selector = monitor["spec"]["selector"]
    selected = [s for s in services if _selects(selector, s["metadata"]["labels"])]
    assert selected == services
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "15s"
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "job"
    for service in services:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        # Prometheus' service discovery names the Service's labels so.
        (source,) = relabel["sourceLabels"]
        key = source.removeprefix("__meta_kubernetes_service_label_")
        value = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v
                 for k, v in service["metadata"]["labels"].items()}[key]
        job = relabel["replacement"].replace("$1", value)
        assert job == f"vecpipe-{service['metadata']['labels']['app.kubernetes.io/component']}"
        assert re.fullmatch(_worker_job_pattern(), job)
