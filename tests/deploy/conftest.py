"""Rendered overlays of deploy/k8s, shared by the deploy tests (rendered once a session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.deploy.kustomize import Doc, build

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """Every overlay rendered. prod reads secrets.env and postgres.env, which only an operator
    writes: render a copy of the tree in which they are the committed *.example files."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    prod = tree / "overlays" / "prod"
    for example in prod.glob("*.env.example"):
        shutil.copyfile(example, prod / example.name.removesuffix(".example"))
    return {name: build(tree / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="session")
def base() -> list[Doc]:
    return build(K8S / "base")
