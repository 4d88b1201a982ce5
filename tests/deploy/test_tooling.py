"""Skaffold, the Grafana dashboard and the CI workflow, checked against the project."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.deploy.conftest import DEPLOY, K8S, ROOT
from tests.deploy.kustomize import Doc, containers, find, split_image
from ticketing.common.metrics import ServiceMetrics
from ticketing.platform.services import SERVICES

OUTCOMES = {"handled", "duplicate", "retry", "failed", "dead"}
DASHBOARD_METRICS = {
    "ticketing_http_requests_total",
    "ticketing_http_request_duration_seconds_bucket",
    "ticketing_events_published_total",
    "ticketing_events_handled_total",
    "ticketing_outbox_backlog",
    "ticketing_outbox_oldest_age_seconds",
    "ticketing_listener_lag_seconds",
}


# --- skaffold --------------------------------------------------------------------------------


def skaffold() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "skaffold.yaml").read_text())
    return config


def test_skaffold_builds_the_image_from_the_repository_root() -> None:
    config = skaffold()
    assert re.fullmatch(r"skaffold/v4beta\d+", config["apiVersion"])
    assert config["kind"] == "Config"
    (artifact,) = config["build"]["artifacts"]
    context = (DEPLOY / artifact["context"]).resolve()
    assert context == ROOT
    assert (context / artifact["docker"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_skaffold_deploys_the_dev_overlay_and_forwards_its_address(
    rendered: dict[str, list[Doc]],
) -> None:
    config = skaffold()
    (path,) = config["manifests"]["kustomize"]["paths"]
    assert (DEPLOY / path).resolve() == K8S / "overlays" / "dev"
    assert "kubectl" in config["deploy"]

    # The image skaffold builds is the one the dev overlay's workloads use.
    (artifact,) = config["build"]["artifacts"]
    dev = rendered["dev"]
    images = {
        split_image(c["image"])[0] for d in dev for c in containers(d) if "ticketing" in c["image"]
    }
    assert images == {artifact["image"]}

    # The ingress is forwarded to the address the dev config calls the public URL.
    forwards = config["portForward"]
    public = urlsplit(find(dev, "ConfigMap", "ticketing-config")["data"]["TICKETING_PUBLIC_URL"])
    ingress = [f for f in forwards if f["resourceName"] == "ingress-nginx-controller"]
    assert [(f["port"], f["localPort"]) for f in ingress] == [(80, public.port)]
    namespace = find(dev, "Namespace", "ticketing-dev")["metadata"]["name"]
    for forward in forwards:
        if forward["namespace"] == namespace:
            find(dev, "Service", forward["resourceName"])


# --- the Grafana dashboard -------------------------------------------------------------------


def exposed_metrics() -> set[str]:
    """The sample names a service's /metrics exposes, from its actual registry."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = set()
    for family in ServiceMetrics("probe").registry.collect():
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads((DEPLOY / "grafana" / "ticketing-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels: list[dict[str, Any]] = dashboard["panels"]
    return panels


def test_the_dashboard_queries_metrics_the_services_expose() -> None:
    panels = dashboard_panels()
    exprs = [t["expr"] for p in panels if p["type"] != "row" for t in p["targets"]]
    assert exprs and all(p["targets"] for p in panels if p["type"] != "row")
    used = {m for expr in exprs for m in re.findall(r"\bticketing_[a-z_]+\b", expr)}
    assert used >= DASHBOARD_METRICS, DASHBOARD_METRICS - used
    assert used <= exposed_metrics(), used - exposed_metrics()
    for expr in exprs:
        for values in re.findall(r'outcome=~?"([^"]+)"', expr):
            assert set(values.split("|")) <= OUTCOMES, expr


def test_the_dashboard_layout_is_well_formed() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0


# --- CI ----------------------------------------------------------------------------------------


def workflow() -> dict[Any, Any]:
    config: dict[Any, Any] = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    return config


def runs(job: dict[str, Any]) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def script_commands(name: str) -> list[str]:
    """The .venv/bin commands a script runs, without the .venv/bin/ prefix."""
    lines = (ROOT / "scripts" / name).read_text().splitlines()
    return [line.strip().removeprefix(".venv/bin/") for line in lines if line.startswith(".venv")]


def test_ci_lints_with_the_commands_of_scripts_test() -> None:
    config = workflow()
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean true.
    triggers = config["on"] if "on" in config else config[True]
    assert "pull_request" in triggers and "push" in triggers
    lint = runs(config["jobs"]["lint"])
    expected = [c for c in script_commands("test") if c.split()[0] in {"ruff", "mypy"}]
    expected += [c for c in script_commands("test") if c.startswith("lint-imports")]
    assert len(expected) == 4
    for command in expected:
        assert command in lint, command
    for name, job in config["jobs"].items():
        if any("pytest" in r or "ruff" in r for r in runs(job)):
            assert any('pip install -e ".[dev]"' in r for r in runs(job)), name


def test_ci_runs_every_test_directory_on_real_infrastructure() -> None:
    jobs = workflow()["jobs"]
    assert any("pytest -q tests/deploy" in r for r in runs(jobs["manifests"]))
    test = jobs["test"]
    suites = set(test["strategy"]["matrix"]["suite"])
    directories = {
        p.parent.name for p in (ROOT / "tests").glob("*/test_*.py") if p.parent.name != "deploy"
    }
    assert suites == directories
    commands = "\n".join(runs(test))
    assert "tests/${{ matrix.suite }}" in commands
    assert test["env"]["TICKETING_TEST_INFRA"] == "real"
    assert {"postgres", "redis"} <= set(test["services"])
    assert re.search(r"docker run .*nats:2\.10 -js", commands), "NATS with JetStream"
    ports = {p for service in test["services"].values() for p in service["ports"]}
    assert {"5432:5432", "6379:6379"} <= ports
    assert "-p 4222:4222" in commands


def test_ci_builds_the_image_and_runs_the_migrations_from_it() -> None:
    image = "\n".join(runs(workflow()["jobs"]["image"]))
    assert "docker build -f deploy/Dockerfile" in image
    loop = re.search(r"for service in ([\w ]+); do", image)
    assert loop, "the migrate command of every database, run from the image"
    assert set(loop.group(1).split()) == {n for n, s in SERVICES.items() if s.has_database}
    assert "--read-only --tmpfs /tmp" in image
