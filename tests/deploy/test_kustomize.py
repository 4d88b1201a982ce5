"""The small kustomize behind the manifest tests: it must render what kustomize would, and
refuse what it does not implement rather than render something else."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.kustomize import Unsupported, build, find, merge, split_image

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  labels: {{tier: {tier}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
        - name: app
          image: ticketing
          args: ["{name}"]
          env: [{{name: A, value: "1"}}, {{name: B, value: "2"}}]
        - name: sidecar
          image: busybox:1.36
"""


def write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(
        tmp_path / "base",
        {
            "kustomization.yaml": "resources: [front.yaml, back.yaml, secret.yaml]\n",
            "front.yaml": DEPLOYMENT.format(name="front", tier="service"),
            "back.yaml": DEPLOYMENT.format(name="back", tier="worker"),
            "secret.yaml": "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n"
            "stringData: {KEY: REPLACE_ME}\n",
        },
    )


def test_an_overlay_patches_generates_scales_retags_and_namespaces(
    tmp_path: Path, base: Path
) -> None:
    overlay = write(
        tmp_path / "overlay",
        {
            "kustomization.yaml": """\
namespace: ns
resources: [../base]
replicas: [{name: back, count: 3}]
images: [{name: ticketing, newName: registry.example.com/ticketing, newTag: "1.2"}]
patches:
  - path: env.yaml
  - path: limits.yaml
    target: {kind: Deployment, labelSelector: tier=service}
secretGenerator:
  - {name: s, behavior: replace, literals: [KEY=value]}
generatorOptions: {disableNameSuffixHash: true}
""",
            "env.yaml": """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: back}
spec:
  template:
    spec:
      containers:
        - name: app
          args: ["other"]
          env: [{name: B, value: "20"}, {name: C, value: "3"}]
""",
            "limits.yaml": """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
spec:
  template:
    spec:
      containers: [{name: app, resources: {limits: {cpu: "1"}}}]
""",
        },
    )
    docs = build(overlay)
    front, back = find(docs, "Deployment", "front"), find(docs, "Deployment", "back")
    back_app, back_sidecar = back["spec"]["template"]["spec"]["containers"]
    assert back["spec"]["replicas"] == 3 and front["spec"]["replicas"] == 1
    assert back_app["args"] == ["other"]  # a plain list is replaced
    assert back_app["env"] == [  # a list of named items merges by name
        {"name": "A", "value": "1"},
        {"name": "B", "value": "20"},
        {"name": "C", "value": "3"},
    ]
    assert back_app["image"] == "registry.example.com/ticketing:1.2"
    assert back_sidecar["image"] == "busybox:1.36"
    assert "resources" not in back_app  # the target selects tier=service only
    front_app = front["spec"]["template"]["spec"]["containers"][0]
    assert front_app["resources"] == {"limits": {"cpu": "1"}}
    secret = find(docs, "Secret", "s")
    assert secret["data"] == {"KEY": "dmFsdWU="} and "stringData" not in secret
    assert {d["metadata"]["namespace"] for d in docs} == {"ns"}


@pytest.mark.parametrize(
    "kustomization",
    [
        "resources: [../base]\ncommonLabels: {a: b}\n",
        "resources: [../base]\nsecretGenerator: [{name: t, literals: [A=b]}]\n",
        "resources: [../base]\npatches: [{path: p.yaml, options: {allowNameChange: true}}]\n",
    ],
)
def test_what_is_not_implemented_is_refused(tmp_path: Path, base: Path, kustomization: str) -> None:
    overlay = write(tmp_path / "overlay", {"kustomization.yaml": kustomization, "p.yaml": "{}"})
    with pytest.raises(Unsupported):
        build(overlay)


def test_lists_merged_by_other_keys_and_directives_are_refused() -> None:
    with pytest.raises(Unsupported):
        merge({"ports": [{"containerPort": 1}]}, {"ports": [{"containerPort": 2}]})
    with pytest.raises(Unsupported):
        merge({"a": 1}, {"$patch": "delete"})
    assert merge({"a": 1, "b": {"c": 2}}, {"a": None, "b": {"d": 3}}) == {"b": {"c": 2, "d": 3}}


def test_a_delete_patch_removes_the_object(tmp_path: Path, base: Path) -> None:
    overlay = write(
        tmp_path / "overlay",
        {
            "kustomization.yaml": "resources: [../base]\npatches: [{path: p.yaml}]\n",
            "p.yaml": "$patch: delete\napiVersion: apps/v1\nkind: Deployment\n"
            "metadata: {name: back}\n",
        },
    )
    names = {(d["kind"], d["metadata"]["name"]) for d in build(overlay)}
    assert names == {("Deployment", "front"), ("Secret", "s")}


def test_a_patch_that_matches_nothing_fails(tmp_path: Path, base: Path) -> None:
    overlay = write(
        tmp_path / "overlay",
        {
            "kustomization.yaml": "resources: [../base]\npatches: [{path: p.yaml}]\n",
            "p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: typo}\n",
        },
    )
    with pytest.raises(ValueError, match="matches nothing"):
        build(overlay)


def test_image_references_split_like_kubernetes() -> None:
    assert split_image("ticketing") == ("ticketing", None, None)
    assert split_image("registry:5000/ticketing:1.0") == ("registry:5000/ticketing", "1.0", None)
    assert split_image("r/t@sha256:ab") == ("r/t", None, "sha256:ab")
