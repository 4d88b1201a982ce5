"""The Kubernetes manifests (deploy/k8s) and the image (deploy/Dockerfile), checked offline.

The overlays are rendered by tests/deploy/kustomize.py (no kustomize binary), every object
is validated against the Kubernetes API schema of K8S_VERSION, and the platform's own facts
(the service registry, the settings classes, the CLI) are checked against what is deployed.
"""

from __future__ import annotations

import ast
import base64
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pydantic
import pytest
import typer.main
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic_settings import BaseSettings
from starlette.routing import Match

from tests.deploy.conftest import DEPLOY, K8S, OVERLAYS, ROOT
from tests.deploy.kustomize import (
    Doc,
    build,
    containers,
    find,
    pod_spec,
    read_env_file,
    split_image,
)
from ticketing.cli import app as cli_app
from ticketing.common.settings import Settings
from ticketing.platform.services import SERVICES, ServiceSpec

# The oldest Kubernetes minor version the manifests must be valid for.
K8S_VERSION = "1.30"
IMAGE = "ticketing"
PORT = 8000
NAMESPACES = {"dev": "ticketing-dev", "prod": "ticketing"}
REPLICAS = {"dev": 1, "prod": 2}
NATS_NODES = {"dev": 1, "prod": 3}
WITH_DATABASE = [name for name, spec in SERVICES.items() if spec.has_database]
WITH_ROUTES = [name for name, spec in SERVICES.items() if spec.prefix is not None]
CONFIG_KEYS = {
    "TICKETING_ENV",
    "TICKETING_NATS_URL",
    "TICKETING_REDIS_URL",
    "TICKETING_PUBLIC_URL",
    "TICKETING_API_URL",
    "TICKETING_LOG_JSON",
    "TICKETING_ORDER_TTL_SECONDS",
}
SECRET_KEYS = {
    "TICKETING_JWT_KEY",
    "TICKETING_STRIPE_SECRET_KEY",
    "TICKETING_STRIPE_WEBHOOK_SECRET",
    "TICKETING_DATABASE_URL",
    "TICKETING_SMTP_URL",
}

overlays = pytest.mark.parametrize("overlay", OVERLAYS)
services = pytest.mark.parametrize("name", list(SERVICES))


# --- helpers ---------------------------------------------------------------------------------


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def app_container(deployment: Doc) -> Doc:
    pod = pod_spec(deployment)
    assert pod is not None
    (container,) = pod["containers"]
    return dict(container)


def secret_values(secret: Doc) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    return values


def source_values(docs: list[Doc], kind: str, name: str) -> dict[str, str]:
    doc = find(docs, kind, name)
    return secret_values(doc) if kind == "Secret" else dict(doc.get("data", {}))


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The environment a container gets from envFrom and env (values resolved)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(source_values(docs, "ConfigMap", source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(source_values(docs, "Secret", source["secretRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            key = ref["secretKeyRef"]
            env[var["name"]] = source_values(docs, "Secret", key["name"])[key["key"]]
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[var["name"]] = source_values(docs, "ConfigMap", key["name"])[key["key"]]
        else:
            env[var["name"]] = "<from the downward API>"
    return env


def ticketing_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for doc in docs:
        for container in containers(doc):
            if split_image(container["image"])[0].rsplit("/", 1)[-1] == IMAGE:
                yield doc, container


def settings_classes() -> list[type[BaseSettings]]:
    found: list[type[BaseSettings]] = [Settings]
    for spec in SERVICES.values():
        module, _, attr = spec.settings_path.partition(":")
        found.append(getattr(importlib.import_module(module), attr))
    return found


def settings_env_names() -> set[str]:
    names: set[str] = set()
    for cls in settings_classes():
        prefix = cls.model_config.get("env_prefix")
        assert prefix == "TICKETING_", f"{cls.__name__} reads env prefix {prefix!r}"
        names |= {prefix + field.upper() for field in cls.model_fields}
    return names


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (cpu in cores, memory in bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6}
    units |= {"G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def nats_size(value: str) -> float:
    """A size in nats.conf (e.g. 16GB, 1536MB), read as powers of 1024 to be conservative."""
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)B?", value.upper())
    assert match, f"unexpected size {value!r}"
    power = "BKMGT".index(match.group(2) or "B")
    return float(int(match.group(1)) * 1024**power)


def port_number(container: Doc, port: str | int) -> int:
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def selects(selector: dict[str, str], doc: Doc) -> bool:
    spec = pod_spec(doc)
    if spec is None:
        return False
    labels = doc["spec"]["template"]["metadata"].get("labels", {})
    return all(labels.get(k) == v for k, v in selector.items())


def env_of_service(docs: list[Doc], name: str) -> dict[str, str]:
    return container_env(docs, app_container(find(docs, "Deployment", name)))


# --- every object is a valid Kubernetes object -----------------------------------------------


@overlays
def test_every_object_is_valid_for_the_pinned_kubernetes_version(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    errors = []
    for doc in rendered[overlay]:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    assert not errors, "\n".join(errors)
    kinds = {d["kind"] for d in rendered[overlay]}
    assert {"Deployment", "Service", "StatefulSet", "Ingress", "ConfigMap"} <= kinds
    assert {"Secret", "HorizontalPodAutoscaler", "Namespace"} <= kinds


def test_the_validator_rejects_what_it_should() -> None:
    """Guard against a validator that accepts anything (a misspelt field, a wrong type)."""
    good = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    kubernetes_validate.validate(good, K8S_VERSION, strict=True)
    for bad in ({**good, "dta": {}}, {**good, "data": {"TICKETING_LOG_JSON": True}}):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@overlays
def test_everything_lives_in_the_overlay_namespace(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    namespace = NAMESPACES[overlay]
    assert [d["metadata"]["name"] for d in of_kind(docs, "Namespace")] == [namespace]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]


# --- services: Deployment, Service, probes, resources, security ------------------------------


@overlays
@services
def test_every_service_has_a_deployment_and_a_service(
    rendered: dict[str, list[Doc]], overlay: str, name: str
) -> None:
    docs = rendered[overlay]
    deployment = find(docs, "Deployment", name)
    container = app_container(deployment)
    assert split_image(container["image"])[0].rsplit("/", 1)[-1] == IMAGE
    assert container.get("args") == [name, "--port", str(PORT)]
    assert "command" not in container, "the image's entrypoint (ticketing serve) must run"
    assert port_number(container, "http") == PORT

    service = find(docs, "Service", name)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects(service["spec"]["selector"], deployment)
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert port_number(container, port["targetPort"]) == PORT


@overlays
@services
def test_every_deployment_is_probed_sized_and_locked_down(
    rendered: dict[str, list[Doc]], overlay: str, name: str
) -> None:
    deployment = find(rendered[overlay], "Deployment", name)
    pod = pod_spec(deployment)
    assert pod is not None
    container = app_container(deployment)

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert port_number(container, http["port"]) == PORT, probe

    resources = container["resources"]
    for resource in ("cpu", "memory"):
        request = quantity(resources["requests"][resource])
        limit = quantity(resources["limits"][resource])
        assert 0 < request <= limit, resource

    pod_security = pod.get("securityContext", {})
    security = container["securityContext"]
    assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True
    assert security.get("runAsUser", pod_security.get("runAsUser")) == dockerfile_uid()
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


@overlays
def test_every_ticketing_container_runs_the_same_image(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    images = {c["image"] for _doc, c in ticketing_containers(rendered[overlay])}
    assert len(images) == 1, images
    if overlay == "prod":
        (image,) = images
        repo, tag, digest = split_image(image)
        assert repo != IMAGE and (tag or digest), "prod pulls a pinned image from a registry"


@services
def test_every_service_app_serves_the_probed_paths(name: str, tmp_path: Path) -> None:
    """What the probes and the Prometheus annotations ask for exists in the app (building an
    app connects to nothing; only its lifespan does)."""
    urls = {  # never contacted: nothing connects before the lifespan starts
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/{{service}}.db",
        "nats_url": "nats://127.0.0.1:1",
        "redis_url": "redis://127.0.0.1:1/0",
        "smtp_url": "smtp://127.0.0.1:1",
        "stripe_secret_key": "sk_test_unused",
    }
    app = SERVICES[name].create_app(data_dir=tmp_path, **urls)

    def served(path: str) -> bool:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
        return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)

    assert not served("/no/such/path")
    missing = [path for path in ("/healthz", "/readyz", "/metrics") if not served(path)]
    assert not missing, f"{name} does not serve {missing}"


def test_deployment_args_parse_as_the_serve_command() -> None:
    """What the manifests pass after the entrypoint is a valid `ticketing serve` call."""
    serve = typer.main.get_command(cli_app).commands["serve"]  # type: ignore[attr-defined]
    for name in SERVICES:
        context = serve.make_context("serve", [name, "--port", str(PORT)])
        assert context.params["service"] == name
        assert context.params["port"] == PORT
        assert context.params["host"] == "0.0.0.0"


@services
def test_the_image_entrypoint_works_for_every_service(name: str) -> None:
    """`ticketing serve <name>` as the container runs it (here with --help: no infra)."""
    result = subprocess.run(
        [sys.executable, "-m", "ticketing", "serve", name, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout and "--host" in result.stdout


# --- routing and scaling ---------------------------------------------------------------------


@overlays
def test_the_ingress_routes_every_prefix_to_its_service(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    (ingress,) = of_kind(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    routes = {}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["pathType"] == "Prefix"
            routes[path["path"]] = path["backend"]["service"]
    assert set(routes) == {SERVICES[name].prefix for name in WITH_ROUTES}
    for name in WITH_ROUTES:
        backend = routes[str(SERVICES[name].prefix)]
        assert backend["name"] == name
        service = find(docs, "Service", name)
        assert backend["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
    assert routes["/"]["name"] == "web"
    routed = {backend["name"] for backend in routes.values()}
    assert not {n for n, s in SERVICES.items() if s.prefix is None} & routed


@overlays
def test_replicas_and_autoscalers(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    for name in SERVICES:
        assert find(docs, "Deployment", name)["spec"]["replicas"] == REPLICAS[overlay], name
    hpas = {h["metadata"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == set(WITH_ROUTES), "an autoscaler for each HTTP service"
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert hpa["spec"]["minReplicas"] == REPLICAS[overlay] < hpa["spec"]["maxReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"]["type"] == "Utilization"


def test_prod_gives_the_services_more_resources(rendered: dict[str, list[Doc]]) -> None:
    for name in SERVICES:
        dev = app_container(find(rendered["dev"], "Deployment", name))["resources"]
        prod = app_container(find(rendered["prod"], "Deployment", name))["resources"]
        for level in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert quantity(prod[level][resource]) >= quantity(dev[level][resource])
        assert quantity(prod["requests"]["memory"]) > quantity(dev["requests"]["memory"])


@overlays
def test_references_between_objects_resolve(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    workloads = [d for d in docs if pod_spec(d) is not None]
    for service in of_kind(docs, "Service"):
        selected = [w for w in workloads if selects(service["spec"]["selector"], w)]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            for workload in selected:
                ports = [c for c in containers(workload) if c.get("ports")]
                assert any(
                    port["targetPort"] in (p.get("name"), p["containerPort"])
                    for c in ports
                    for p in c["ports"]
                ), (service["metadata"]["name"], port)
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"]["matchLabels"], w) for w in workloads)
    for sts in of_kind(docs, "StatefulSet"):
        find(docs, "Service", sts["spec"]["serviceName"])
    for workload in workloads:
        pod = pod_spec(workload)
        assert pod is not None
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                find(docs, "ConfigMap", volume["configMap"]["name"])
        for container in containers(workload):
            container_env(docs, container)  # raises on a missing ConfigMap, Secret or key


# --- configuration: the env the code reads ---------------------------------------------------


@overlays
def test_every_ticketing_env_var_is_a_settings_field(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    known = settings_env_names()
    config = source_values(docs, "ConfigMap", "ticketing-config")
    secret = source_values(docs, "Secret", "ticketing-secrets")
    assert set(config) >= CONFIG_KEYS
    assert set(secret) >= SECRET_KEYS
    names = set(config) | set(secret)
    for _doc, container in ticketing_containers(docs):
        names |= {var["name"] for var in container.get("env", [])}
    unknown = {n for n in names if n.startswith("TICKETING_")} - known
    assert not unknown, f"no settings class reads {sorted(unknown)}"
    assert "{service}" in secret["TICKETING_DATABASE_URL"]


@overlays
@services
def test_every_service_gets_the_urls_it_needs(
    rendered: dict[str, list[Doc]], overlay: str, name: str
) -> None:
    env = env_of_service(rendered[overlay], name)
    for need in SERVICES[name].needs:
        assert env.get(f"TICKETING_{need.upper()}"), f"{name} needs TICKETING_{need.upper()}"
    assert env.get("TICKETING_JWT_KEY"), "every service verifies the session cookie"


@overlays
def test_in_cluster_urls_point_at_services_that_exist(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    env = env_of_service(docs, "auth") | env_of_service(docs, "expiration")
    for key in ("TICKETING_NATS_URL", "TICKETING_REDIS_URL", "TICKETING_DATABASE_URL"):
        url = urlsplit(env[key])
        assert url.hostname and url.port
        service = find(docs, "Service", url.hostname)
        assert url.port in {p["port"] for p in service["spec"]["ports"]}, key
    smtp = urlsplit(env["TICKETING_SMTP_URL"])
    if overlay == "dev":  # Mailpit, in the cluster
        service = find(docs, "Service", str(smtp.hostname))
        assert smtp.port in {p["port"] for p in service["spec"]["ports"]}


@services
def test_the_dev_overlay_configures_every_service(
    rendered: dict[str, list[Doc]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settings class accepts the dev environment and finds every URL `serve` needs."""
    spec: ServiceSpec = SERVICES[name]
    use_environment(monkeypatch, env_of_service(rendered["dev"], name))
    settings = spec.settings()
    settings.require_urls(*spec.needs)
    assert settings.env == "dev"
    assert settings.log_json is False
    if name in WITH_DATABASE:
        assert settings.service_database_url(name).endswith(f"/ticketing_{name}")


@services
def test_prod_refuses_to_start_with_the_placeholders(
    rendered: dict[str, list[Doc]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Applied without real secrets, production fails at start-up rather than run insecurely."""
    use_environment(monkeypatch, env_of_service(rendered["prod"], name))
    with pytest.raises(pydantic.ValidationError, match="TICKETING_JWT_KEY"):
        SERVICES[name].settings()


def use_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key in [k for k in os.environ if k.startswith("TICKETING_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_base_secrets_are_marked_placeholders(base: list[Doc]) -> None:
    for name in ("ticketing-secrets",):
        values = source_values(base, "Secret", name)
        assert set(values) == SECRET_KEYS
        assert all("REPLACE_ME" in value for value in values.values()), values
    postgres = source_values(build(K8S / "postgres"), "Secret", "postgres-credentials")
    assert set(postgres) == {"POSTGRES_PASSWORD"}
    assert "REPLACE_ME" in postgres["POSTGRES_PASSWORD"]


def test_the_prod_secret_files_are_examples_and_git_ignored(
    rendered: dict[str, list[Doc]],
) -> None:
    prod = K8S / "overlays" / "prod"
    ignored = set((prod / ".gitignore").read_text().split())
    for example in sorted(prod.glob("*.env.example")):
        real = example.name.removesuffix(".example")
        assert real in ignored, f"{real} must never be committed"
        values = read_env_file(example)
        assert values and all("REPLACE_ME" in v for v in values.values()), example.name
    assert set(read_env_file(prod / "secrets.env.example")) == SECRET_KEYS
    dev = source_values(rendered["dev"], "Secret", "ticketing-secrets")
    assert set(dev) == SECRET_KEYS


@overlays
def test_the_database_password_matches_postgres(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    url = urlsplit(source_values(docs, "Secret", "ticketing-secrets")["TICKETING_DATABASE_URL"])
    postgres = find(docs, "StatefulSet", "postgres")
    env = container_env(docs, containers(postgres)[0])
    assert url.password == env["POSTGRES_PASSWORD"]
    assert url.username == env["POSTGRES_USER"]


# --- the migrate Job -------------------------------------------------------------------------


@overlays
def test_the_migrate_job_migrates_every_database_in_production(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    """Production services never create tables (only `ticketing migrate` does); dev services
    create theirs at start, so there the Job would race them and must not exist."""
    docs = rendered[overlay]
    env = source_values(docs, "ConfigMap", "ticketing-config")["TICKETING_ENV"]
    jobs = [j for j in of_kind(docs, "Job") if j["metadata"]["name"] == "ticketing-migrate"]
    if env != "production":
        assert not jobs, "TICKETING_ENV=dev creates the tables: a migrate Job would race it"
        return
    (job,) = jobs
    pod = pod_spec(job)
    assert pod is not None and pod["restartPolicy"] in ("OnFailure", "Never")
    commands = []
    for container in containers(job):
        commands.append([*container.get("command", []), *container.get("args", [])])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container_env(docs, container).get("TICKETING_DATABASE_URL")
        assert container["resources"]["limits"]
    assert sorted(commands) == sorted(["ticketing", "migrate", name] for name in WITH_DATABASE)
    assert "web" not in WITH_DATABASE


def test_the_migrate_job_command_parses_as_the_migrate_command(base: list[Doc]) -> None:
    migrate = typer.main.get_command(cli_app).commands["migrate"]  # type: ignore[attr-defined]
    for container in containers(find(base, "Job", "ticketing-migrate")):
        program, command, *args = container["command"]
        assert (program, command) == ("ticketing", "migrate")
        context = migrate.make_context("migrate", args)
        assert SERVICES[context.params["service"]].has_database
        assert not context.params["new"], "upgrade, never write a revision"


# --- NATS, Redis, PostgreSQL -----------------------------------------------------------------


@overlays
def test_nats_runs_jetstream_on_volumes_and_clusters_in_prod(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    nats = find(docs, "StatefulSet", "nats")
    nodes = NATS_NODES[overlay]
    assert nats["spec"]["replicas"] == nodes
    headless = find(docs, "Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"

    conf = find(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
    store = re.search(r"store_dir:\s*(\S+)", conf)
    assert store and "jetstream {" in conf
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    (container,) = containers(nats)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert store.group(1).startswith(mount["mountPath"].rstrip("/") + "/")
    file_store = re.search(r"max_file_store:\s*(\S+)", conf)
    assert file_store, "bound the store below the volume size"
    volume = quantity(claim["spec"]["resources"]["requests"]["storage"])
    assert nats_size(file_store.group(1)) < volume

    routes = set(re.findall(r"nats://([\w.-]+):(\d+)", conf))
    if nodes == 1:
        assert "cluster" not in conf, "a lone node must not wait for routes"
    else:
        cluster_port = port_number(container, "cluster")
        host = "nats-{}." + headless["metadata"]["name"]
        assert routes == {(host.format(i), str(cluster_port)) for i in range(nodes)}
        assert nats["spec"]["podManagementPolicy"] == "Parallel"
        pdb = find(docs, "PodDisruptionBudget", "nats")
        assert pdb["spec"]["maxUnavailable"] == 1


@overlays
def test_redis_persists_with_an_append_only_file(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    redis = find(rendered[overlay], "StatefulSet", "redis")
    (container,) = containers(redis)
    args = [*container.get("command", []), *container.get("args", [])]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert args[args.index("--dir") + 1] == mount["mountPath"]


@overlays
def test_postgres_is_one_instance_on_a_volume(rendered: dict[str, list[Doc]], overlay: str) -> None:
    postgres = find(rendered[overlay], "StatefulSet", "postgres")
    assert postgres["spec"]["replicas"] == 1
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    (container,) = containers(postgres)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    pgdata = next(e["value"] for e in container["env"] if e["name"] == "PGDATA")
    assert pgdata.startswith(mount["mountPath"] + "/")


# --- the image -------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """deploy/Dockerfile as stages of (INSTRUCTION, arguments), continuations joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    stages: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def dockerfile_uid() -> int:
    final = dockerfile_stages()[-1]
    (user,) = [args for instruction, args in final if instruction == "USER"]
    return int(user.split(":")[0])


def test_the_dockerfile_builds_a_wheel_and_runs_it_as_non_root() -> None:
    preamble, *stages = dockerfile_stages()
    args = dict(a.split("=", 1) for i, a in preamble if i == "ARG")
    images = [args.get(f.split()[0].strip("${}"), f.split()[0]) for s in stages for i, f in s
              if i == "FROM"]  # fmt: skip
    assert images and all(image == "python:3.11-slim" for image in images)
    builder, final = stages[0], stages[-1]
    assert len(stages) >= 2, "multi-stage"

    builder_runs = " ".join(a for i, a in builder if i == "RUN")
    assert "pip wheel" in builder_runs and ".whl" in builder_runs
    assert "venv" in builder_runs

    text = (DEPLOY / "Dockerfile").read_text()
    assert "[dev]" not in text and "pip install -e" not in text, "no dev dependencies"
    assert not [a for i, a in final if i == "RUN" and "pip" in a], "nothing installed at the end"
    assert [a for i, a in final if i == "COPY" and a.startswith("--from=")]

    assert dockerfile_uid() == 10001
    assert json.loads(next(a for i, a in final if i == "ENTRYPOINT")) == ["ticketing", "serve"]
    assert [a for i, a in final if i == "EXPOSE"] == [str(PORT)]
    env = " ".join(a for i, a in final if i == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert "TICKETING_DATA_DIR=/tmp/" in env, "the only writable place is /tmp"

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "ticketing" in pyproject["project"]["scripts"], "the entrypoint is a console script"


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    patterns: list[tuple[re.Pattern[str], bool]] = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            text = re.escape(line.lstrip("!").strip("/"))
            text = text.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
            text = text.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            text = text.replace(r"\[", "[").replace(r"\]", "]")
            patterns.append((re.compile(text), negated))
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for regex, negated in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    copied = ["pyproject.toml", "README.md", "src/ticketing/cli.py", "src/ticketing/web/static"]
    for path in copied:
        assert (ROOT / path).exists(), path
        assert not dockerignore_excludes(path), path
    kept_out = [
        ".venv/bin/python", ".git/HEAD", "tests/conftest.py", "artifacts/screenshots/a.png",
        ".ticketing/auth.db", "src/.ticketing/x", ".mypy_cache/x", ".pytest_cache/x",
        ".ruff_cache/x", "src/ticketing/__pycache__/cli.cpython-311.pyc",
        "deploy/k8s/overlays/prod/secrets.env", "src/ticketing.egg-info/PKG-INFO",
    ]  # fmt: skip
    for path in kept_out:
        assert dockerignore_excludes(path), path


def imported_modules(root: Path) -> dict[str, set[str]]:
    """Top-level modules imported by the code under `root` (not under TYPE_CHECKING)."""
    found: dict[str, set[str]] = {}

    def visit(node: ast.AST, path: Path) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name.split(".")[0], set()).add(str(path))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.setdefault(node.module.split(".")[0], set()).add(str(path))
        for child in ast.iter_child_nodes(node):
            visit(child, path)

    for path in sorted(root.rglob("*.py")):
        visit(ast.parse(path.read_text()), path.relative_to(ROOT))
    return found


def runtime_distributions() -> set[str]:
    """[project.dependencies] and everything they require: what the image installs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pending = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement = pending.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        extras = ["", *sorted(requirement.extras)]
        for text in importlib.metadata.requires(requirement.name) or []:
            needed = Requirement(text)
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras):
                pending.append(needed)
    return {name for name, _extras in seen}


def test_the_image_installs_every_package_the_code_imports() -> None:
    """The image has [project.dependencies] only, no dev extra: every import must be there."""
    installed = runtime_distributions()
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in imported_modules(ROOT / "src" / "ticketing").items():
        if module in sys.stdlib_module_names or module in ("ticketing", "bench"):  # ours
            continue
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & installed:
            missing[module] = sorted(files)[:3]
    assert not missing, f"imported but not in [project.dependencies]: {missing}"
