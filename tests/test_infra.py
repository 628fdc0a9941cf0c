"""The deployment files: infra/ (Docker image, KubeRay, MLflow, MinIO, kustomization) and ray_cluster.yaml.

Everything here runs offline and in seconds, but the check-then-train script, which trains a tiny
model on local Ray and registers it in a SQLite MLflow store for real (a minute or two). What
validates what:

- ray_cluster.yaml: Ray's own cluster-launcher validator, `validate_config(prepare_config(cfg))`
  (private API of Ray 2.60; for provider `aws`, `prepare_config` only merges Ray's bundled
  defaults: no AWS call; the AWS bootstrapping happens later, in `ray up`).
- KubeRay objects (ray.io/v1): jsonschema on the `openAPIV3Schema` of the CRDs in
  ../shared/kuberay-crds (never copied into the project; skipped with a reason where absent),
  made strict the way the API server's strict field validation is (`kubectl apply` default): an
  object schema with `properties` and no `additionalProperties` or `x-kubernetes-preserve-unknown-
  fields` rejects unknown fields (a typo such as `minReplica` would otherwise be pruned silently);
  `x-kubernetes-int-or-string` admits integers and strings; int32/int64 formats become ranges;
  `nullable` admits null; `x-kubernetes-list-type: map|set` is checked for duplicate keys/items.
  The CEL rules (`x-kubernetes-validations`) are not evaluated: the few that exist concern fields
  these manifests do not use (deletionStrategy, managedBy, gcsFaultToleranceOptions). On top, the
  checks the KubeRay operator itself makes (ray-operator/controllers/ray/utils/validation.go at
  the commit SOURCE.md names) are re-stated in `kuberay_semantic_errors`, and the pod templates
  embedded in the CRs go through the official core schemas as PodTemplates.
- Core objects (Namespace, ConfigMap, Service, Deployment, StatefulSet, PVC, Job): the official
  strict schemas shipped by `kubernetes-validate`, for the oldest and newest Kubernetes we target.
- Secrets: no Secret object, no literal credential, secret-looking env only from secretKeyRef.
- `kubectl kustomize infra` when kubectl is on PATH (it embeds kustomize; offline).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
import zoneinfo
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from components.data import read_manifest
from components.retrieve import manifest_checksum
from components.shards import build_shards

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAY_CLUSTER_YAML = REPO / "ray_cluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
SECRETS_EXAMPLE = INFRA / "secrets.example.env"
NAMESPACE = "lcr"

CRD_DIRS = (Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds", Path("/work/shared/kuberay-crds"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
KUBERAY_KINDS = set(CRD_FILES)
CORE_KINDS = {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet", "PersistentVolumeClaim", "Job"}
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest cluster we claim to support, newest kubernetes-validate ships

DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
LITERAL_CREDENTIALS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URL": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@"),
    "secret assignment": re.compile(
        r"(?i)\b[\w-]*(password|secret|token)[\w-]*[ \t]*[:=][ \t]*['\"]?[A-Za-z0-9/+_=-]{12,}"),
}


# ---------------------------------------------------------------------------------------------
# Loading


def yaml_load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def manifests() -> tuple[tuple[str, dict], ...]:
    """(file relative to infra/, object) for every Kubernetes object under infra/."""
    out = []
    for path in manifest_files():
        for doc in yaml_load_all(path):
            out.append((path.relative_to(INFRA).as_posix(), doc))
    return tuple(out)


def objects(*kinds: str) -> list[tuple[str, dict]]:
    return [(f, o) for f, o in manifests() if not kinds or o.get("kind") in kinds]


def obj_id(item: tuple[str, dict]) -> str:
    return f"{item[0]}:{item[1].get('kind')}/{item[1].get('metadata', {}).get('name')}"


def the(kind: str, name: str | None = None) -> dict:
    found = [o for _, o in objects(kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''} under infra/, found {len(found)}"
    return found[0]


def walk_strings(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk_strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk_strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template in a core workload or a KubeRay object."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [("spec.template.spec", spec["template"]["spec"])]
    return [(where, template["spec"]) for where, template in ray_pod_templates(obj)]


def ray_cluster_specs(obj: dict) -> list[tuple[str, dict]]:
    kind, spec = obj["kind"], obj["spec"]
    if kind == "RayCluster":
        return [("spec", spec)]
    if kind == "RayJob":
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])] if "rayClusterSpec" in spec else []
    if kind == "RayCronJob":
        template = spec["jobTemplate"]
        return [("spec.jobTemplate.rayClusterSpec", template["rayClusterSpec"])] if "rayClusterSpec" in template else []
    return []


def ray_pod_templates(obj: dict) -> list[tuple[str, dict]]:
    out = []
    for where, cluster in ray_cluster_specs(obj):
        out.append((f"{where}.headGroupSpec.template", cluster["headGroupSpec"]["template"]))
        for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
            out.append((f"{where}.workerGroupSpecs[{i}].template", group["template"]))
    return out


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("containers", []) + pod_spec.get("initContainers", [])


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in bytes)."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    assert match and (match.group(2) in units or not match.group(2)), f"not a quantity: {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def test_every_manifest_is_a_kubernetes_object():
    assert manifest_files(), "no manifests under infra/"
    for file, obj in manifests():
        assert isinstance(obj, dict) and {"apiVersion", "kind", "metadata"} <= obj.keys(), f"{file}: not an object"
        assert obj["kind"] in KUBERAY_KINDS | CORE_KINDS, f"{file}: unexpected kind {obj['kind']} (add a check for it)"
        name = obj["metadata"].get("name", "")
        assert DNS1123_SUBDOMAIN.fullmatch(name) and len(name) <= 253, \
            f"{file}: metadata.name {name!r} is not a DNS-1123 subdomain"
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE, f"{file}: namespace other than {NAMESPACE}"
    ids = [(o["kind"], o["metadata"]["name"]) for _, o in manifests()]
    assert len(ids) == len(set(ids)), "two objects of the same kind and name"


# ---------------------------------------------------------------------------------------------
# ray_cluster.yaml: Ray's own cluster-launcher validator


def test_ray_cluster_yaml_passes_rays_validator():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(RAY_CLUSTER_YAML.read_text())
    assert cfg["provider"]["type"] == "aws"
    prepared = prepare_config(copy.deepcopy(cfg))  # merges ray/autoscaler/aws/defaults.yaml; no AWS call
    validate_config(prepared)  # ray-schema.json, then the cross-field checks (head type, min/max workers)

    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is a CPU node"
    by_instance = {t["node_config"]["InstanceType"]: t for t in types.values()}
    assert by_instance["p3.2xlarge"]["resources"]["GPU"] == 1
    assert by_instance["p4d.24xlarge"]["resources"]["GPU"] == 8
    for name, node_type in types.items():
        if node_type is head:
            continue
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= prepared["max_workers"], name
    # The launcher must not silently fall back to Ray's default AMI (an Ubuntu 18.04 DLAMI).
    assert all(t["node_config"].get("ImageId") for t in types.values())


def test_ray_cluster_yaml_rejects_a_broken_config():
    """The validator is not a no-op: an unknown top-level field and a head type missing from
    available_node_types both fail."""
    pytest.importorskip("jsonschema")
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(RAY_CLUSTER_YAML.read_text())
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**copy.deepcopy(cfg), "max_worker": 3}))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config({**copy.deepcopy(cfg), "head_node_type": "nope"}))


def test_ray_cluster_yaml_installs_the_project_and_ships_the_configs():
    cfg = yaml.safe_load(RAY_CLUSTER_YAML.read_text())
    mounts = cfg["file_mounts"]
    local_to_remote = {os.path.normpath(local): remote for remote, local in mounts.items()}
    for local in local_to_remote:
        assert (REPO / local).exists(), f"file_mounts: {local} does not exist (paths are relative to the repo root)"
    assert "lcr_core/configs" in local_to_remote, "file_mounts must ship lcr_core/configs"
    tree = local_to_remote.get(".")
    assert tree, "file_mounts must upload the working tree that setup_commands installs"
    assert any(re.search(rf"pip install\b.*\s{re.escape(tree)}/?(\s|$)", cmd) for cmd in cfg["setup_commands"]), \
        "setup_commands must pip-install the uploaded tree"
    # What must never be uploaded (rsync_exclude, plus .gitignore through rsync_filter).
    assert ".gitignore" in cfg.get("rsync_filter", [])
    for heavy in (".venv", "data", "runs", "mlflow.db", "mlartifacts", "reports", "benchmark_runs"):
        assert f"/{heavy}" in cfg.get("rsync_exclude", []), f"rsync_exclude should name /{heavy}"
    image = cfg["docker"]["image"]
    assert re.search(r"ray:2\.60\.0-py311", image), f"the container must have Ray 2.60.0 and Python 3.11: {image}"


def test_ray_cluster_yaml_can_host_the_cub_run():
    """Some GPU node type holds cub.yaml's Ray Train workers (1 GPU + cpus_per_worker CPUs each)."""
    from lcr_core.config import load_config

    cfg = load_config("cub", ["backbone_weights=s3://lcr-models/resnet50-imagenet.pth"])
    launcher = yaml.safe_load(RAY_CLUSTER_YAML.read_text())
    fits = {}
    for name, node_type in launcher["available_node_types"].items():
        res = node_type["resources"]
        per_node = min(res.get("CPU", 0) // cfg.cpus_per_worker, res.get("GPU", 0))
        fits[name] = per_node * node_type.get("max_workers", 0)
    assert max(fits.values()) >= cfg.num_workers, f"workers that fit per node type: {fits}"


# ---------------------------------------------------------------------------------------------
# KubeRay objects against the CRDs


@functools.cache
def crd_dir() -> Path | None:
    return next((d for d in CRD_DIRS if all((d / f).is_file() for f in CRD_FILES.values())), None)


def require_crds() -> Path:
    found = crd_dir()
    if found is None:
        pytest.skip("KubeRay CRDs not found (looked in " + ", ".join(map(str, CRD_DIRS)) +
                    "); they are test data kept outside the project")
    return found


def strict_structural(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema as a JSON Schema (draft 4) that behaves like the API
    server with strict field validation; x-kubernetes-* keys stay for the custom keyword below."""
    if isinstance(node, list):
        return [strict_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_structural(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    fmt = out.get("format")
    if out.get("type") == "integer" and fmt in ("int32", "int64"):
        bits = 31 if fmt == "int32" else 63
        out.setdefault("minimum", -(2**bits))
        out.setdefault("maximum", 2**bits - 1)
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _list_type(validator, list_type, instance, schema):
    import jsonschema

    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = [repr(x) for x in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"x-kubernetes-list-type set: duplicate items in {instance!r}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        tuples = [tuple(item.get(k) for k in keys) for item in instance if isinstance(item, dict)]
        dupes = sorted({t for t in tuples if tuples.count(t) > 1}, key=repr)
        if dupes:
            yield jsonschema.ValidationError(f"x-kubernetes-list-type map: duplicate {keys} {dupes}")


@functools.cache
def crd_validator(kind: str):
    import jsonschema

    crd = yaml_load_all(require_crds() / CRD_FILES[kind])[0]
    assert crd["spec"]["names"]["kind"] == kind
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert versions["v1"]["served"], f"{kind}: ray.io/v1 is not served by this CRD"
    schema = strict_structural(versions["v1"]["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})
    cls.check_schema(schema)
    return cls(schema)


def crd_errors(obj: dict) -> list[str]:
    assert obj["apiVersion"] == "ray.io/v1", f"{obj['kind']}: apiVersion {obj['apiVersion']}, expected ray.io/v1"
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def kuberay_items() -> list[tuple[str, dict]]:
    return objects(*KUBERAY_KINDS)


def test_kuberay_objects_are_present():
    kinds = {o["kind"] for _, o in kuberay_items()}
    assert kinds == KUBERAY_KINDS, f"expected a RayCluster, a RayJob and a RayCronJob, found {sorted(kinds)}"


@pytest.mark.parametrize("item", kuberay_items(), ids=obj_id)
def test_kuberay_object_validates_against_its_crd(item):
    errors = crd_errors(item[1])
    assert not errors, f"{obj_id(item)} does not match the KubeRay v1.7 CRD:\n" + "\n".join(errors)


@pytest.mark.parametrize("mutation, expected", [
    (lambda o: o["spec"]["workerGroupSpecs"][0].update(minReplica=1), "minReplica"),  # a typo
    (lambda o: o["spec"]["workerGroupSpecs"][0].update(maxReplicas="4"), "'4' is not of type 'integer'"),
    (lambda o: o["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
    (lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .update(cpu="8 cores"), "does not match"),
    (lambda o: o["spec"]["workerGroupSpecs"][0].update(minReplicas=2**31), "is greater than the maximum"),
    (lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append(
        {"name": "again", "containerPort": 8265}), "duplicate"),
    (lambda o: o["spec"]["autoscalerOptions"].update(version="v3"), "is not one of"),
])
def test_the_crd_check_rejects_broken_objects(mutation, expected):
    """The schema check is strict enough to catch typos, wrong types, bad quantities, int32
    overflow, duplicate list-map keys and bad enums."""
    require_crds()
    broken = copy.deepcopy(the("RayCluster"))
    mutation(broken)
    errors = crd_errors(broken)
    assert any(expected in e for e in errors), f"expected an error containing {expected!r}, got {errors}"


DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}  # MaxRay*NameLength in KubeRay v1.7
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
START_PARAM_RESOURCES = {"num-cpus", "num-gpus", "memory", "resources"}


def cluster_semantic_errors(spec: dict, where: str) -> list[str]:
    """ValidateRayClusterSpec (validation.go), the parts that apply to these manifests."""
    errors = []
    workers = spec.get("workerGroupSpecs", [])
    groups = [("head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in workers]
    names = [name for name, _ in groups[1:]]
    if len(names) != len(set(names)):
        errors.append(f"{where}: worker group names repeat: {names}")
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = autoscaling and spec.get("autoscalerOptions", {}).get("version") == "v2"
    for name, group in groups:
        pod = group["template"]["spec"]
        if not pod.get("containers"):
            errors.append(f"{where}: group {name} has no container")
        if group.get("resources") and START_PARAM_RESOURCES & set(group.get("rayStartParams", {})):
            errors.append(f"{where}: group {name} sets resources in both rayStartParams and resources")
        if "labels" in group.get("rayStartParams", {}):
            errors.append(f"{where}: group {name}: rayStartParams['labels'] is not supported")
        if v2 and pod.get("restartPolicy", "Never") != "Never":
            errors.append(f"{where}: group {name}: restartPolicy must be Never or unset with autoscaler v2")
        if name == "head":
            continue
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{where}: group {name} needs minReplicas and maxReplicas without autoscaling")
        if lo is not None and hi is not None and not 0 <= lo <= hi:
            errors.append(f"{where}: group {name}: need 0 <= minReplicas {lo} <= maxReplicas {hi}")
        if n is not None and lo is not None and hi is not None and not lo <= n <= hi:
            errors.append(f"{where}: group {name}: replicas {n} outside [{lo}, {hi}]")
    return errors


def job_semantic_errors(spec: dict, where: str) -> list[str]:
    """ValidateRayJobSpec (validation.go), without the feature-gated deletionStrategy parts."""
    errors = []
    mode = spec.get("submissionMode", "K8sJobMode")
    selector = spec.get("clusterSelector") or {}
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if mode not in SUBMISSION_MODES:
        errors.append(f"{where}: submissionMode {mode!r} not in {sorted(SUBMISSION_MODES)}")
    if not spec.get("entrypoint") and mode != "InteractiveMode":
        errors.append(f"{where}: no entrypoint")
    if spec.get("suspend") and not shutdown:
        errors.append(f"{where}: suspend needs shutdownAfterJobFinishes")
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append(f"{where}: ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes: true")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append(f"{where}: negative ttlSecondsAfterFinished")
    if "rayClusterSpec" not in spec and not selector:
        errors.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append(f"{where}: clusterSelector needs a non-empty ray.io/cluster")
        if mode == "SidecarMode":
            errors.append(f"{where}: clusterSelector is not supported in SidecarMode")
        if spec.get("suspend"):
            errors.append(f"{where}: clusterSelector mode cannot be suspended")
        if spec.get("backoffLimit", 0) > 0:
            errors.append(f"{where}: backoffLimit is incompatible with clusterSelector")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append(f"{where}: backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec:
            errors.append(f"{where}: SidecarMode supports neither submitterPodTemplate nor submitterConfig")
        head_pod = spec.get("rayClusterSpec", {}).get("headGroupSpec", {}).get("template", {}).get("spec", {})
        if head_pod.get("restartPolicy", "Never") != "Never":
            errors.append(f"{where}: SidecarMode needs the head's restartPolicy Never or unset")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            errors.append(f"{where}: {field} must be positive")
    if "deletionStrategy" in spec and shutdown:
        errors.append(f"{where}: deletionStrategy (feature-gated) is not combined with shutdownAfterJobFinishes here")
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
        if not isinstance(runtime_env, dict):
            errors.append(f"{where}: runtimeEnvYAML is not a mapping")
    except yaml.YAMLError as err:
        errors.append(f"{where}: runtimeEnvYAML is not YAML: {err}")
    if "rayClusterSpec" in spec:
        errors += cluster_semantic_errors(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
    return errors


CRON_FIELDS = [(0, 59, {}), (0, 23, {}), (1, 31, {}),
               (1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
               (0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())})]
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_errors(schedule: str) -> list[str]:
    """What robfig/cron's ParseStandard (used by KubeRay) rejects: 5 fields or a descriptor."""
    if schedule in CRON_DESCRIPTORS or schedule.startswith("@every "):
        return []
    if "TZ" in schedule:
        return ["use spec.timeZone, not TZ= / CRON_TZ= in the schedule"]
    fields = schedule.split()
    if len(fields) != 5:
        return [f"{schedule!r}: expected 5 fields (minute hour day-of-month month day-of-week)"]
    errors = []
    for text, (lo, hi, names) in zip(fields, CRON_FIELDS):
        for part in text.split(","):
            rng, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                errors.append(f"bad step in {part!r}")
            if rng in ("*", "?"):
                continue
            for bound in rng.split("-", 1):
                value = names.get(bound.lower(), bound)
                if not str(value).isdigit() or not lo <= int(value) <= hi:
                    errors.append(f"{bound!r} outside {lo}-{hi} in {text!r}")
    return errors


def kuberay_semantic_errors(obj: dict) -> list[str]:
    kind, name, spec = obj["kind"], obj["metadata"]["name"], obj["spec"]
    errors = []
    if not DNS1035.fullmatch(name) or len(name) > NAME_LIMITS[kind]:
        errors.append(f"{kind} name {name!r}: a DNS-1035 label of at most {NAME_LIMITS[kind]} characters")
    if kind == "RayCluster":
        errors += cluster_semantic_errors(spec, "spec")
    elif kind == "RayJob":
        errors += job_semantic_errors(spec, "spec")
    elif kind == "RayCronJob":
        errors += [f"spec.schedule: {e}" for e in cron_errors(spec["schedule"])]
        if "timeZone" in spec:
            try:
                zoneinfo.ZoneInfo(spec["timeZone"])
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                errors.append(f"spec.timeZone {spec['timeZone']!r} is not an IANA time zone")
        errors += job_semantic_errors(spec["jobTemplate"], "spec.jobTemplate")
    return errors


@pytest.mark.parametrize("item", kuberay_items(), ids=obj_id)
def test_kuberay_object_passes_the_operators_checks(item):
    errors = kuberay_semantic_errors(item[1])
    assert not errors, f"{obj_id(item)} would be rejected by the KubeRay operator:\n" + "\n".join(errors)


@pytest.mark.parametrize("kind, mutation, expected", [
    ("RayJob", lambda s: s.update(ttlSecondsAfterFinished=60, shutdownAfterJobFinishes=False),
     "ttlSecondsAfterFinished"),
    ("RayJob", lambda s: s.update(submissionMode="SidecarMode"), "SidecarMode"),
    ("RayJob", lambda s: s.pop("clusterSelector"), "one of rayClusterSpec or clusterSelector"),
    ("RayCronJob", lambda s: s.update(schedule="0 0 */6 * * *"), "5 fields"),
    ("RayCronJob", lambda s: s.update(timeZone="Mars/Olympus"), "IANA"),
    ("RayCronJob", lambda s: s["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=5),
     "minReplicas 5"),
])
def test_the_operator_checks_reject_broken_objects(kind, mutation, expected):
    broken = copy.deepcopy(the(kind))
    mutation(broken["spec"])
    errors = kuberay_semantic_errors(broken)
    assert any(expected in e for e in errors), f"expected an error containing {expected!r}, got {errors}"


@pytest.mark.parametrize("item", kuberay_items(), ids=obj_id)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kuberay_pod_templates_validate_as_core_pod_templates(item, version):
    kv = pytest.importorskip("kubernetes_validate")
    for where, template in ray_pod_templates(item[1]):
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            kv.validate(wrapper, version, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{obj_id(item)} {where}: {str(err).splitlines()[0]}")


def test_ray_pods_match_the_image_and_ray_version():
    for file, obj in kuberay_items():
        for _, cluster in ray_cluster_specs(obj):
            assert cluster.get("rayVersion") == "2.60.0", f"{file}: rayVersion should be the image's Ray 2.60.0"
            assert cluster.get("enableInTreeAutoscaling") is True, f"{file}: in-tree autoscaling off"
            head = cluster["headGroupSpec"]["template"]["spec"]
            assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers(head)), \
                f"{file}: the head should be CPU-only"
            gpu_groups = [g for g in cluster["workerGroupSpecs"]
                          if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                                 for c in containers(g["template"]["spec"]))]
            assert gpu_groups, f"{file}: no worker group with nvidia.com/gpu limits"
        for _, template in ray_pod_templates(obj):
            for c in containers(template["spec"]):
                assert c["image"].startswith("ghcr.io/your-org/lcr:"), f"{file}: {c['name']} runs {c['image']}"


def gpu_capacity(cluster: dict) -> tuple[int, float, int]:
    """(max GPU pods, CPUs per GPU pod, GPUs per pod) of the cluster's first GPU worker group."""
    for group in cluster["workerGroupSpecs"]:
        for c in containers(group["template"]["spec"]):
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                return group["maxReplicas"], quantity(limits.get("cpu", 0)), int(limits["nvidia.com/gpu"])
    return 0, 0.0, 0


def parse_pretrain_args(tokens: list[str]) -> tuple[str, list[str], set[str]]:
    """(config, overrides, flags) of `lcr pretrain` arguments."""
    config, overrides, flags, i = None, [], set(), 0
    while i < len(tokens):
        if tokens[i] == "--config":
            config, i = tokens[i + 1], i + 2
            continue
        if tokens[i].startswith("--"):
            flags.add(tokens[i])
        else:
            assert "=" in tokens[i], f"not a field=value override: {tokens[i]!r}"
            overrides.append(tokens[i])
        i += 1
    assert config, "no --config"
    return config, overrides, flags


def check_capacity(cfg, cluster: dict, where: str) -> None:
    pods, cpus, gpus = gpu_capacity(cluster)
    assert cfg.use_gpu, f"{where}: the config trains on CPU"
    assert gpus >= 1 and cpus >= cfg.cpus_per_worker, \
        f"{where}: a GPU pod ({cpus} CPUs) cannot hold a worker of cpus_per_worker={cfg.cpus_per_worker}"
    per_pod = min(gpus, int(cpus // cfg.cpus_per_worker))
    assert pods * per_pod >= cfg.num_workers, \
        f"{where}: {pods} pods x {per_pod} workers < num_workers={cfg.num_workers}: the job would wait forever"


def test_rayjob_runs_lcr_pretrain_on_the_raycluster():
    from lcr_core.config import load_config

    job = the("RayJob")["spec"]
    tokens = shlex.split(job["entrypoint"])
    assert tokens[:2] == ["lcr", "pretrain"], f"entrypoint: {job['entrypoint']}"
    config, overrides, _ = parse_pretrain_args(tokens[2:])
    cfg = load_config(config, overrides)  # the same validation `lcr pretrain` does first
    assert config == "cub"
    assert cfg.shards.startswith("s3://") and cfg.storage_path.startswith("s3://")
    target = job["clusterSelector"]["ray.io/cluster"]
    cluster = the("RayCluster", target)
    check_capacity(cfg, cluster["spec"], f"RayCluster {target}")


def test_raycronjob_runs_the_check_then_train_script():
    from lcr_core.config import load_config

    cron = the("RayCronJob")["spec"]
    template = cron["jobTemplate"]
    tokens = shlex.split(template["entrypoint"])
    assert tokens[0] == "bash", tokens
    script = Path(tokens[1])
    shards, model_name, prefix, *pretrain = tokens[2:]
    # The script is mounted from the ConfigMap at the path the entrypoint names.
    head = template["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mounted = [(m, volumes[m["name"]]) for c in containers(head) for m in c.get("volumeMounts", [])
               if script.parent == Path(m["mountPath"])]
    assert mounted, f"{script.parent} is not mounted in the head pod"
    config_map = mounted[0][1]["configMap"]["name"]
    assert script.name in the("ConfigMap", config_map)["data"]
    # The arguments make a valid `lcr pretrain` call once the script appends shards=, run_name= and init_from=.
    config, overrides, _ = parse_pretrain_args(pretrain)
    cfg = load_config(config, overrides + [f"shards={shards}", f"run_name={prefix}-0123456789ab",
                                           f"init_from=models:/{model_name}@champion"])
    assert config == "inat2019" and shards.startswith("s3://") and re.fullmatch(r"[\w.-]+", model_name)
    check_capacity(cfg, template["rayClusterSpec"], "RayCronJob rayClusterSpec")
    # No overlapping runs: the deadline ends a run before the next daily tick.
    assert cron["schedule"].split()[2:] == ["*", "*", "*"], "the overlap argument assumes a daily schedule"
    assert 0 < template["activeDeadlineSeconds"] < 24 * 3600


def test_runtime_env_holds_no_secret():
    for file, obj in kuberay_items():
        for spec in (obj["spec"], obj["spec"].get("jobTemplate", {})):
            if "runtimeEnvYAML" not in spec:
                continue
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
            for name in runtime_env.get("env_vars", {}):
                assert not SECRET_NAME.search(name), \
                    f"{file}: {name} in runtimeEnvYAML: Ray writes runtime_env variables to its logs"


# ---------------------------------------------------------------------------------------------
# The check-then-train script, run for real against local folders


def run_script(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_check_then_train_script_trains_registers_then_waits_for_new_shards(tmp_path):
    """The script as the RayCronJob runs it, for real on a tiny synthetic set: local Ray, SQLite MLflow."""
    script = tmp_path / "check-then-train.sh"
    script.write_text(the("ConfigMap", "lcr-cron-scripts")["data"]["check-then-train.sh"])
    shards = tmp_path / "shards"
    build_shards("synthetic", str(shards), options={"num_classes": 3, "train_per_class": 8, "test_per_class": 3,
                                                    "image_size": 32}, progress=False)
    env = {"LCR": f"{sys.executable} -m components.cli", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "RAY_AUTH_MODE": "disabled"}
    args = [str(shards), "cron-model", "cron", "--config", "demo", "backbone=tiny", "backbone_weights=null",
            "freeze_stages=0", "image_size=32", "eval_resize=32", "batch_size=8", "queue_size=16", "embed_dim=16",
            "projector_hidden=32", "num_projections=4", "epochs=1", "warmup_epochs=0", "num_workers=1",
            "loader_workers=0", f"storage_path={tmp_path / 'runs'}"]

    first = run_script(script, *args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    checksum = manifest_checksum(read_manifest(str(shards / "train")))
    assert f"check-then-train: no cron-model@champion yet; run cron-{checksum[:12]}\n" in first.stdout
    assert (tmp_path / "runs" / f"cron-{checksum[:12]}").is_dir()
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("cron-model", "champion")
    assert str(champion.version) == "1" and champion.tags["lcr.train_manifest_sha256"] == checksum

    second = run_script(script, *args, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing new at" in second.stdout
    assert len(client.search_model_versions("name = 'cron-model'")) == 1


# ---------------------------------------------------------------------------------------------
# Core Kubernetes objects against the official schemas


def core_items() -> list[tuple[str, dict]]:
    return objects(*CORE_KINDS)


@pytest.mark.parametrize("item", core_items(), ids=obj_id)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_object_validates_against_the_kubernetes_schema(item, version):
    kv = pytest.importorskip("kubernetes_validate")
    try:
        kv.validate(item[1], version, strict=True)
    except kv.ValidationError as err:
        pytest.fail(f"{obj_id(item)} (Kubernetes {version}): {err}")


def test_the_core_check_rejects_a_typo():
    kv = pytest.importorskip("kubernetes_validate")
    broken = copy.deepcopy(the("Deployment", "mlflow"))
    broken["spec"]["template"]["spec"]["containers"][0]["envFrom "] = []
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_the_stack_has_its_parts():
    assert the("Namespace")["metadata"]["name"] == NAMESPACE
    for name in ("minio", "mlflow"):
        the("Deployment", name)
        the("Service", name)
    the("StatefulSet", "mlflow-postgres")
    the("Service", "mlflow-postgres")
    the("PersistentVolumeClaim", "minio-data")
    postgres = the("StatefulSet", "mlflow-postgres")
    assert postgres["spec"]["volumeClaimTemplates"], "PostgreSQL needs a persistent volume"
    command = " ".join(the("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "--backend-store-uri=postgresql://" in command
    assert "--artifacts-destination=s3://" in command


def test_services_select_their_pods_and_ports():
    workloads = objects("Deployment", "StatefulSet")
    for file, svc in objects("Service"):
        selector = svc["spec"]["selector"]
        matches = [w for _, w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"].get("labels", {}).items()]
        assert len(matches) == 1, f"{file}: Service {svc['metadata']['name']} selects {len(matches)} workloads"
        pod = matches[0]["spec"]["template"]["spec"]
        port_names = {p.get("name") for c in containers(pod) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert not isinstance(target, str) or target in port_names, f"{file}: no container port named {target}"
    for file, w in workloads:
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items(), file


def test_references_resolve():
    """Every ConfigMap and PVC a pod uses is in infra/; every Secret key it uses is one that
    secrets.example.env tells the operator to create."""
    config_maps = {o["metadata"]["name"]: o for _, o in objects("ConfigMap")}
    claims = {o["metadata"]["name"] for _, o in objects("PersistentVolumeClaim")}
    documented = documented_secrets()
    for file, obj in objects("Deployment", "StatefulSet", "Job", *KUBERAY_KINDS):
        for where, pod in pod_specs(obj):
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, f"{file} {where}: {volume}"
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{file} {where}: {volume}"
                assert "secret" not in volume or volume["secret"]["secretName"] in documented, f"{file}: {volume}"
            for c in containers(pod):
                for source in c.get("envFrom", []):
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in config_maps, f"{file} {where}: {source}"
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in documented, f"{file} {where}: {source}"
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in documented.get(ref["name"], set()), \
                            f"{file} {where}: {env['name']} uses secret {ref['name']}/{ref['key']}, " \
                            "which secrets.example.env does not create"
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref:
                        assert ref["key"] in config_maps[ref["name"]]["data"], f"{file}: {env}"


# ---------------------------------------------------------------------------------------------
# Secrets: references only


def documented_secrets() -> dict[str, set[str]]:
    """{secret name: keys} from the `kubectl create secret generic` lines of secrets.example.env."""
    text = SECRETS_EXAMPLE.read_text().replace("\\\n", " ")
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.search(r"create secret generic ([\w-]+)(.*)", line)
        if match:
            found.setdefault(match.group(1), set()).update(re.findall(r"--from-literal=(\w+)=", match.group(2)))
    return found


def test_secrets_example_documents_the_secrets_without_values():
    documented = documented_secrets()
    assert documented, "secrets.example.env should show how to create the Secrets"
    assignments = [line for line in SECRETS_EXAMPLE.read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    keys = set()
    for line in assignments:
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"not NAME=VALUE: {line!r}"
        assert value == "", f"secrets.example.env must not hold values: {line!r}"
        keys.add(name)
    assert set().union(*documented.values()) == keys, "every documented Secret key has an (empty) line, and back"


def test_no_secret_objects_and_no_literal_credentials():
    for file, obj in manifests():
        assert obj["kind"] != "Secret", f"{file}: ship Secret references, not Secret objects"
        for path, text in walk_strings(obj):
            for what, pattern in LITERAL_CREDENTIALS.items():
                assert not pattern.search(text), f"{file}{path}: looks like a literal credential ({what})"
        if obj["kind"] == "ConfigMap":
            for key in obj.get("data", {}):
                assert not SECRET_NAME.search(key), f"{file}: ConfigMap key {key} belongs in a Secret"
    for path in (RAY_CLUSTER_YAML, DOCKERFILE, SECRETS_EXAMPLE, INFRA / "kustomization.yaml"):
        for what, pattern in LITERAL_CREDENTIALS.items():
            assert not pattern.search(path.read_text()), f"{path}: looks like a literal credential ({what})"


def test_secret_looking_env_comes_from_secret_refs():
    checked = 0
    for file, obj in objects("Deployment", "StatefulSet", "Job", *KUBERAY_KINDS):
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                for env in c.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        checked += 1
                        assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), \
                            f"{file} {where} {c['name']}: {env['name']} must come from valueFrom.secretKeyRef"
                for source in c.get("envFrom", []):
                    assert "secretRef" in source or "configMapRef" in source, f"{file}: {source}"
        for _, cluster in ray_cluster_specs(obj) if obj["kind"] in KUBERAY_KINDS else []:
            for env in cluster.get("autoscalerOptions", {}).get("env", []):
                assert not SECRET_NAME.search(env["name"]) or "value" not in env, f"{file}: {env}"
    assert checked >= 5, "expected the MinIO, PostgreSQL and MLflow credentials to be checked"


def test_the_secret_scan_catches_literals():
    assert LITERAL_CREDENTIALS["AWS access key id"].search("AKIA" + "ABCDEFGHIJKLMNOP")
    assert LITERAL_CREDENTIALS["password in a URL"].search("postgresql://mlflow:" + "hunter2@db:5432/mlflow")
    assert not LITERAL_CREDENTIALS["password in a URL"].search("postgresql://mlflow@db:5432/mlflow")
    assert LITERAL_CREDENTIALS["secret assignment"].search("MINIO_ROOT_PASSWORD=" + "s3cr3t-passw0rd-long")


# ---------------------------------------------------------------------------------------------
# The kustomization


def test_kustomization_lists_exactly_the_manifests():
    kustomization = yaml.safe_load((INFRA / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    present = [p.relative_to(INFRA).as_posix() for p in manifest_files()]
    assert sorted(listed) == sorted(present), \
        f"unlisted: {sorted(set(present) - set(listed))}, missing: {sorted(set(listed) - set(present))}"
    assert kustomization["namespace"] == NAMESPACE
    assert any(o["kind"] == "Namespace" and o["metadata"]["name"] == NAMESPACE for _, o in manifests())
    generated = [k for k in ("configMapGenerator", "secretGenerator") if k in kustomization]
    assert not generated, f"{generated}: every object is a listed file (and no Secret is generated)"


def test_kustomize_builds_the_stack():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl (with its built-in kustomize) is not on PATH")
    built = subprocess.run([kubectl, "kustomize", str(INFRA)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert len(docs) == len(manifests())
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lcr"


# ---------------------------------------------------------------------------------------------
# The Docker image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_on_python_311():
    steps = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    base = next(a for k, a in steps if k == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.search(r"py311|python3\.11|py3\.11", base), f"base image {base} should say it has Python 3.11"
    runs = " && ".join(a for k, a in steps if k == "RUN")
    assert re.search(r"pip install\b[^&|;]*\s\.(\s|$)", runs), "no `pip install .`"
    copied = set()
    for keyword, rest in steps:
        if keyword == "COPY":
            tokens = [t for t in rest.split() if not t.startswith("--")]
            copied.update(tokens[:-1])  # the sources; the last token is the destination
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: not in the build context (the repository root)"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"the image does not COPY the package {package} that pyproject includes"
    assert {"pyproject.toml", "README.md"} <= copied


def test_dockerfile_holds_no_secret():
    for keyword, rest in dockerfile_instructions():
        if keyword in ("ENV", "ARG", "LABEL"):
            for name in re.findall(r"(\w+)=", rest) + ([rest.split()[0]] if "=" not in rest else []):
                assert not SECRET_NAME.search(name), f"{keyword} {name}: no credentials in the image"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|secret|credential|\.aws|\.ssh", rest, re.IGNORECASE), f"{keyword} {rest}"
    text = DOCKERFILE.read_text()
    for what, pattern in LITERAL_CREDENTIALS.items():
        assert not pattern.search(text), what


def docker_ignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes, a pattern
    that matches a parent folder matches everything inside it, `**` spans folders."""

    def to_regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = relpath.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw[1:] if negate else raw).lstrip("/")
        regex = to_regex(pattern)
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def build_context_files() -> list[str]:
    patterns = dockerignore_patterns()
    files = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith((".venv/", ".git/")) or not path.is_file():
            continue
        if not docker_ignored(rel, patterns):
            files.append(rel)
    return sorted(files)


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = dockerignore_patterns()
    for heavy in (".venv", ".venv/lib/python3.11/site-packages/torch/__init__.py", "data/shards/train/x.tar",
                  "runs/demo/checkpoint", "mlflow.db", "mlartifacts/1/x", "reports/demo/index.html",
                  "benchmark_runs/x.json", "lcr_core/__pycache__/config.cpython-311.pyc", "lcr.egg-info/PKG-INFO",
                  ".git/HEAD", "tests/test_infra.py"):
        assert docker_ignored(heavy, patterns), f"{heavy} would be sent to the Docker daemon"
    for needed in ("pyproject.toml", "README.md", "lcr_core/config.py", "lcr_core/configs/cub.yaml",
                   "components/cli.py", "pipeline/__init__.py"):
        assert not docker_ignored(needed, patterns), f"{needed} is needed by `pip install .` but ignored"


def test_the_build_context_is_enough_to_install_the_project(tmp_path):
    """What the Dockerfile's context holds after the ignore file builds the lcr wheel, with the
    shipped configs and the `lcr` command: `pip install .` in the image has all it needs."""
    context = tmp_path / "context"
    for rel in build_context_files():
        assert not rel.startswith((".venv", "data/", "runs/", "mlartifacts/", "reports/", "benchmark_runs/")), rel
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, context / rel)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheels"), str(context)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("lcr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("lcr_core/configs/cub.yaml", "lcr_core/configs/inat2019.yaml", "components/cli.py",
                   "components/storage.py", "pipeline/__init__.py"):
        assert needed in names, f"{needed} missing from the wheel built from the image's context"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lcr = components.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_dockerfile_base_matches_the_pins():
    """The image's Ray is the one pyproject pins, and ray_cluster.yaml's containers use the same base."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    version = ray_pin.split("==")[1]
    args = dict(a.split("=", 1) for k, a in dockerfile_instructions() if k == "ARG" and "=" in a)
    assert f"ray:{version}-py311" in args["BASE_IMAGE"]
    assert yaml.safe_load(RAY_CLUSTER_YAML.read_text())["docker"]["image"] == args["BASE_IMAGE"]
    assert fnmatch.fnmatch(pyproject["project"]["requires-python"], "*3.11*")
