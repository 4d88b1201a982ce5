"""A small kustomize, enough to render deploy/k8s offline (no kustomize binary needed).

Supported subset of kustomization.yaml; anything else raises `Unsupported`, so an overlay can
never silently use a feature these tests would not render:

- `resources`: files (one or more YAML documents) and directories holding a kustomization.
- `namespace`: set on every namespaced object (a Namespace object keeps its own name).
- `patches`: strategic-merge patches from `path` or inline `patch`, applied to the object
  named by the patch's kind and metadata.name, or, with `target`, to every object matching
  the target's `kind`, `name` (an anchored regex) and `labelSelector` (`k=v[,k=v]` only).
  Merge rules: maps merge recursively; `null` deletes a key; the lists `containers`,
  `initContainers`, `env`, `volumes` and `imagePullSecrets` merge by `name`; every other list
  is replaced. A top-level `$patch: delete` removes the object. Lists that Kubernetes merges
  by another key (`ports`, `volumeMounts`, ...), other `$patch` directives and JSON 6902
  patches are refused.
- `replicas`: `name` + `count` on Deployments and StatefulSets.
- `images`: `name` + `newName` / `newTag` / `digest` on every container and init container.
- `secretGenerator` / `configMapGenerator`: `literals` and `envs` (KEY=VALUE lines, `#`
  comments), `behavior` create, replace or merge, and only with the name-suffix hash
  disabled (`generatorOptions.disableNameSuffixHash: true` or the generator's `options`).

Order, as kustomize: resources, generators, patches, replicas, images, namespace.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "patches",
    "replicas",
    "images",
    "secretGenerator",
    "configMapGenerator",
    "generatorOptions",
}
MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes", "imagePullSecrets"}
# Lists Kubernetes merges by a key other than `name`: this renderer would get them wrong.
REFUSED_LISTS = {
    "ports",
    "volumeMounts",
    "volumeDevices",
    "hostAliases",
    "topologySpreadConstraints",
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "IngressClass",
    "PriorityClass",
}
POD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
}


class Unsupported(ValueError):
    """The kustomization uses something this renderer does not implement."""


def build(directory: Path) -> list[Doc]:
    """Render the kustomization in `directory` as kustomize would (for the subset above)."""
    directory = directory.resolve()
    kfile = directory / "kustomization.yaml"
    spec: Doc = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - KUSTOMIZATION_KEYS
    if unknown:
        raise Unsupported(f"{kfile}: unsupported fields {sorted(unknown)}")

    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        docs.extend(build(path) if path.is_dir() else load_documents(path))

    options = spec.get("generatorOptions", {})
    for kind, key in (("Secret", "secretGenerator"), ("ConfigMap", "configMapGenerator")):
        for generator in spec.get(key, []):
            _generate(docs, kind, generator, options, directory)

    for entry in spec.get("patches", []):
        _apply_patch_entry(docs, entry, directory)
    for entry in spec.get("replicas", []):
        _set_replicas(docs, entry["name"], int(entry["count"]))
    for entry in spec.get("images", []):
        _set_image(docs, entry)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]

    seen: set[tuple[str, str]] = set()
    for doc in docs:
        ident = (doc["kind"], doc["metadata"]["name"])
        if ident in seen:
            raise ValueError(f"{directory}: {ident} defined twice")
        seen.add(ident)
    return docs


def load_documents(path: Path) -> list[Doc]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise ValueError(f"{path}: not a Kubernetes object: {doc!r:.80}")
    return docs


def find(docs: Iterable[Doc], kind: str, name: str) -> Doc:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise KeyError(f"no {kind} {name}")


# --- generators ------------------------------------------------------------------------------


def _generate(docs: list[Doc], kind: str, gen: Doc, options: Doc, directory: Path) -> None:
    unknown = set(gen) - {"name", "behavior", "literals", "envs", "type", "options"}
    if unknown:
        raise Unsupported(f"generator {gen.get('name')}: unsupported fields {sorted(unknown)}")
    merged_options = {**options, **gen.get("options", {})}
    if not merged_options.get("disableNameSuffixHash"):
        raise Unsupported(f"generator {gen['name']}: set disableNameSuffixHash: true")
    pairs: dict[str, str] = {}
    for literal in gen.get("literals", []):
        key, sep, value = literal.partition("=")
        if not sep:
            raise ValueError(f"generator {gen['name']}: literal without '=': {literal!r}")
        pairs[key] = value
    for env_file in gen.get("envs", []):
        pairs.update(read_env_file(directory / env_file))

    if kind == "Secret":
        data = {k: base64.b64encode(v.encode()).decode() for k, v in pairs.items()}
        generated: Doc = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": gen["name"]},
            "type": gen.get("type", "Opaque"),
            "data": data,
        }
    else:
        generated = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": gen["name"]},
            "data": pairs,
        }

    behavior = gen.get("behavior", "create")
    existing = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == gen["name"]]
    if behavior == "create":
        if existing:
            raise ValueError(f"{kind} {gen['name']} exists; use behavior replace or merge")
        docs.append(generated)
    elif behavior in ("replace", "merge"):
        if not existing:
            raise ValueError(f"{kind} {gen['name']}: nothing to {behavior}")
        target = existing[0]
        if behavior == "replace":
            metadata = target["metadata"]
            target.clear()
            target.update(generated)
            target["metadata"] = {**metadata, "name": gen["name"]}
        else:
            if kind == "Secret" and "stringData" in target:
                raise Unsupported(f"merge into {gen['name']}: its stringData would win")
            target.setdefault("data", {}).update(generated["data"])
    else:
        raise Unsupported(f"generator behavior {behavior!r}")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as kustomize reads them: blank lines and `#` comments skipped."""
    pairs: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        if not sep:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


# --- patches ---------------------------------------------------------------------------------


def _apply_patch_entry(docs: list[Doc], entry: Doc, directory: Path) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise Unsupported(f"patch entry: unsupported fields {sorted(unknown)}")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    patches = [p for p in yaml.safe_load_all(text) if p is not None]
    if len(patches) != 1 or not isinstance(patches[0], dict):
        raise Unsupported(f"patch {entry}: exactly one strategic-merge patch per entry")
    patch = patches[0]
    if "target" in entry:
        targets = [doc for doc in docs if _matches(doc, entry["target"])]
    else:
        kind, name = patch["kind"], patch["metadata"]["name"]
        targets = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if not targets:
        raise ValueError(f"patch {entry} matches nothing")
    directive = patch.pop("$patch", None)
    if directive == "delete":
        docs[:] = [doc for doc in docs if not any(doc is target for target in targets)]
        return
    if directive is not None:
        raise Unsupported(f"patch {entry}: $patch: {directive}")
    for doc in targets:
        body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
        merged = merge(doc, {**body, "metadata": _patch_metadata(patch)})
        doc.clear()
        doc.update(merged)


def _patch_metadata(patch: Doc) -> Doc:
    # name and namespace identify the target; labels and annotations are merged.
    return {k: v for k, v in patch.get("metadata", {}).items() if k not in ("name", "namespace")}


def _matches(doc: Doc, target: Doc) -> bool:
    unknown = set(target) - {"kind", "name", "labelSelector"}
    if unknown:
        raise Unsupported(f"patch target: unsupported fields {sorted(unknown)}")
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], doc["metadata"]["name"]):
        return False
    labels = doc["metadata"].get("labels", {})
    for term in filter(None, target.get("labelSelector", "").split(",")):
        key, sep, value = term.partition("=")
        if not sep or value.startswith("="):
            raise Unsupported(f"labelSelector term {term!r}: only k=v is supported")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


def merge(base: Any, patch: Any, key: str = "") -> Any:
    """A strategic merge of `patch` into `base` (the subset in the module docstring)."""
    if isinstance(patch, dict):
        if any(str(k).startswith("$") for k in patch):
            raise Unsupported(f"{key}: $-directives are not supported")
        result = copy.deepcopy(base) if isinstance(base, dict) else {}
        for k, v in patch.items():
            if v is None:
                result.pop(k, None)
            else:
                result[k] = merge(result.get(k), v, k)
        return result
    if isinstance(patch, list):
        if key in REFUSED_LISTS:
            raise Unsupported(f"{key}: Kubernetes merges this list by another key than name")
        if key in MERGE_BY_NAME and isinstance(base, list):
            result_list = copy.deepcopy(base)
            for item in patch:
                index = next(
                    (i for i, old in enumerate(result_list) if old.get("name") == item["name"]),
                    None,
                )
                if index is None:
                    result_list.append(copy.deepcopy(item))
                else:
                    result_list[index] = merge(result_list[index], item, key)
            return result_list
        return copy.deepcopy(patch)
    return patch


# --- replicas and images ---------------------------------------------------------------------


def _set_replicas(docs: list[Doc], name: str, count: int) -> None:
    found = [
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "ReplicaSet")
        and d["metadata"]["name"] == name
    ]
    if not found:
        raise ValueError(f"replicas: no workload named {name}")
    for doc in found:
        doc["spec"]["replicas"] = count


def pod_spec(doc: Doc) -> Doc | None:
    path = POD_TEMPLATE_PATHS.get(doc["kind"])
    if path is None:
        return None
    template: Doc = doc
    for part in path:
        template = template[part]
    spec: Doc = template["spec"]
    return spec


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """`repo[:tag][@digest]` as (repo, tag, digest); a registry port is not a tag."""
    repo, _, digest = image.partition("@")
    tag = None
    last = repo.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = repo.rsplit(":", 1)
    return repo, tag, digest or None


def _set_image(docs: list[Doc], entry: Doc) -> None:
    unknown = set(entry) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise Unsupported(f"images: unsupported fields {sorted(unknown)}")
    for doc in docs:
        for container in containers(doc):
            repo, tag, digest = split_image(container["image"])
            if repo != entry["name"]:
                continue
            repo = entry.get("newName", repo)
            tag = entry.get("newTag", tag)
            if "digest" in entry:
                container["image"] = f"{repo}@{entry['digest']}"
            else:
                container["image"] = (
                    repo + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                )
