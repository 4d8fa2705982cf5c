"""The ModelDeployment spec: defaults and cross-field checks.

Defaults are read from the CRD's own schema so the operator and the API server agree on
them (the API server applies them on write; the operator applies them again so that a spec
written before a default existed, or by a test without an API server, reads the same).
"""

from __future__ import annotations

import copy
import functools
import re
from importlib import resources
from typing import Any

import yaml

Spec = dict[str, Any]


@functools.cache
def crd() -> dict[str, Any]:
    """The CRD as shipped in the package."""
    text = resources.files("radixserve_operator").joinpath("crd/modeldeployments.yaml").read_text()
    return yaml.safe_load(text)


def spec_schema() -> dict[str, Any]:
    """The openAPIV3Schema of `.spec`."""
    version = crd()["spec"]["versions"][0]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Fill absent fields that have a `default`, the way the API server does."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _apply_defaults(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value:
                if name not in schema.get("properties", {}):
                    value[name] = _apply_defaults(value[name], extra)
    elif isinstance(value, list) and "items" in schema:
        return [_apply_defaults(item, schema["items"]) for item in value]
    return value


def with_defaults(spec: Spec) -> Spec:
    """A defaulted deep copy of a ModelDeployment spec."""
    return _apply_defaults(copy.deepcopy(dict(spec)), spec_schema())


MODEL_SOURCES = ("path", "pvc", "huggingFace", "url")
# Server flags the operator sets from other fields and builds on: the Service, probes and
# NetworkPolicy use the port; terminationGracePeriodSeconds is sized from the drain time.
OWNED_FLAGS = {
    "--port": "the pods serve on 30000, which the Service and probes use",
    "--shutdown-timeout": "set engine.shutdownTimeoutSeconds, which also sizes the pods' "
    "terminationGracePeriodSeconds",
}


# A Service's name must be a DNS-1035 label; a custom resource's name need only be a
# DNS-1123 subdomain ("llama-3.1-8b", "3b-instruct"), which the API server would refuse
# for the Service the operator names after it.
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
NAME_RULE = (
    "must be a DNS-1035 label (at most 63 lowercase letters, digits or '-', starting with a "
    "letter and ending with a letter or digit; no dots): the model's Service is named after it"
)
SINGLE_NODE_MODES = ("ReadWriteOnce", "ReadWriteOncePod")


def name_problems(name: str) -> list[str]:
    if len(name) <= 63 and DNS_1035_LABEL.match(name):
        return []
    return [f"metadata.name {name!r} {NAME_RULE}; e.g. {_suggest(name)!r}"]


def _suggest(name: str) -> str:
    fixed = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    fixed = fixed if fixed[:1].isalpha() else f"m-{fixed}"
    return fixed[:63].rstrip("-")


def max_replicas(spec: Spec) -> int:
    autoscaling = spec.get("autoscaling")
    return autoscaling["maxReplicas"] if autoscaling else spec["replicas"]


def problems(spec: Spec, name: str | None = None) -> list[str]:
    """Cross-field mistakes, each phrased as what to change.

    The CRD's CEL rules reject these at admission; the operator checks again because
    objects written before the rules existed (or with validation off) still reach it.
    """
    found: list[str] = name_problems(name) if name is not None else []
    gpus = spec["resources"]["gpus"]
    tp = spec["tensorParallelSize"]
    nodes = spec["parallelism"]["nodes"]
    if gpus == 0 and tp != 1:
        found.append(
            f"tensorParallelSize is {tp} but resources.gpus is 0: request {tp} GPUs per "
            "replica (resources.gpus) or set tensorParallelSize to 1"
        )
    elif gpus == 0 and nodes != 1:
        found.append(
            f"parallelism.nodes is {nodes} but resources.gpus is 0: a replica spreads over "
            "nodes only with tensor parallelism on GPUs"
        )
    elif gpus and tp != gpus * nodes:
        found.append(
            f"tensorParallelSize ({tp}) must equal resources.gpus ({gpus}) times "
            f"parallelism.nodes ({nodes}): each replica shards the model over all of its GPUs"
        )
    sources = [name for name in MODEL_SOURCES if name in spec["model"]]
    if len(sources) > 1:
        found.append(f"set only one model source, not {' and '.join(sources)}")
    sub_path = spec["model"].get("pvc", {}).get("subPath", "")
    if ".." in sub_path.split("/"):
        found.append(f"model.pvc.subPath {sub_path!r} must stay inside the volume (no '..')")
    autoscaling = spec.get("autoscaling")
    if autoscaling and autoscaling["minReplicas"] > autoscaling["maxReplicas"]:
        found.append(
            f"autoscaling.minReplicas ({autoscaling['minReplicas']}) exceeds "
            f"autoscaling.maxReplicas ({autoscaling['maxReplicas']})"
        )
    if autoscaling and autoscaling["minReplicas"] == 0 and "keda" not in autoscaling:
        found.append(
            "autoscaling.minReplicas 0 needs autoscaling.keda: an HPA cannot scale to zero"
        )
    for arg in spec["engine"].get("extraArgs", []):
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            found.append(f"engine.extraArgs must not set {flag}: {OWNED_FLAGS[flag]}")
    cache = spec.get("modelCache")
    if cache and cache["accessMode"] in SINGLE_NODE_MODES and max_replicas(spec) > 1:
        found.append(
            f"modelCache.accessMode {cache['accessMode']} mounts on one node only, but up to "
            f"{max_replicas(spec)} replicas may run (replicas or autoscaling.maxReplicas): "
            "use accessMode ReadWriteMany, or one replica"
        )
    if spec["engine"]["device"] == "cuda" and gpus == 0:
        found.append("engine.device is cuda but resources.gpus is 0: request at least one GPU")
    return found
