"""The ModelDeployment spec: defaults and cross-field checks.

Defaults are read from the CRD's own schema so the operator and the API server agree on
them (the API server applies them on write; the operator applies them again so that a spec
written before a default existed, or by a test without an API server, reads the same).
"""

from __future__ import annotations

import copy
import functools
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


def problems(spec: Spec) -> list[str]:
    """Cross-field mistakes, each phrased as what to change.

    The CRD's CEL rules reject these at admission; the operator checks again because
    objects written before the rules existed (or with validation off) still reach it.
    """
    found: list[str] = []
    gpus = spec["resources"]["gpus"]
    tp = spec["tensorParallelSize"]
    if gpus == 0 and tp != 1:
        found.append(
            f"tensorParallelSize is {tp} but resources.gpus is 0: request {tp} GPUs per "
            "replica (resources.gpus) or set tensorParallelSize to 1"
        )
    elif gpus and tp != gpus:
        found.append(
            f"tensorParallelSize ({tp}) must equal resources.gpus ({gpus}): each replica "
            "shards the model over all of its GPUs"
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
    for arg in spec["engine"].get("extraArgs", []):
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            found.append(f"engine.extraArgs must not set {flag}: {OWNED_FLAGS[flag]}")
    if spec["engine"]["device"] == "cuda" and gpus == 0:
        found.append("engine.device is cuda but resources.gpus is 0: request at least one GPU")
    return found
