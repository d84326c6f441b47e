"""Every manifest in cluster/ against KubeRay v1.7.0's own CRD schemas (strict: unknown fields are errors),
and every pod template against Kubernetes' own schema (kubernetes-validate, strict).

This is the one test that needs ../shared (the CRDs are KubeRay's files, not ours); it skips in a bare
clone without it, and runs in CI, where ../shared is present.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .conftest import REPO

CRDS = REPO.parent / "shared" / "kuberay" / "v1.7.0"
KUBERNETES = "1.30.0"  # the Kubernetes schema version pod templates are checked against

pytestmark = pytest.mark.skipif(not CRDS.is_dir(), reason="KubeRay CRDs live in ../shared (present in CI)")


def _strict(schema: Any) -> Any:
    """The CRD schema with ``additionalProperties: false`` on every object that lists its properties
    (what the API server's pruning would silently drop is an error here)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_schema(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)  # noqa: S506 - safe loader
    (v1,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = _strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's, not the CRD's
    return schema


def _manifests() -> list[Path]:
    return sorted((REPO / "cluster").glob("*.yaml"))


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_manifest_validates_against_kuberays_own_crd(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    errors = sorted(jsonschema.Draft7Validator(_crd_schema(doc["kind"])).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_pod_templates_validate_against_kubernetes(path: Path) -> None:
    import kubernetes_validate

    doc = yaml.safe_load(path.read_text())
    for i, template in enumerate(_pod_templates(doc)):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"},
                        "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES, strict=True)


def test_strictness_catches_a_misspelt_field() -> None:
    doc = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinish"] = True  # missing "es": the API server would drop it silently
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(doc, _crd_schema("RayJob"))
