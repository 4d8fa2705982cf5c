"""The CRD: a valid Kubernetes object whose schema accepts the examples and rejects
broken specs, with CEL rules that agree with the operator's own checks."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from radixserve_operator import spec as specs

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "charts/radixserve/examples").glob("*.yaml"))
SCHEMA = specs.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validator() -> jsonschema.Validator:
    # CRD schemas are OpenAPI v3.0, i.e. draft-4 semantics (boolean exclusiveMinimum).
    return jsonschema.Draft4Validator(SCHEMA)


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "charts/radixserve/examples" / name).read_text())


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(specs.crd(), "1.33.0", strict=True)
    crd = specs.crd()
    assert crd["metadata"]["name"] == "modeldeployments.radixserve.dev"
    assert crd["spec"]["names"]["shortNames"] == ["md"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {
        "Model",
        "Ready",
        "Desired",
        "Phase",
        "Endpoint",
        "Age",
    }


def _walk(schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths that break the structural-schema rules the API server enforces."""
    bad = []
    if "$ref" in schema:
        bad.append(f"{path}: $ref")
    typed = (
        "type" in schema
        or schema.get("x-kubernetes-int-or-string")
        or schema.get("x-kubernetes-preserve-unknown-fields")
    )
    if not typed:
        bad.append(f"{path}: no type")
    for name, sub in schema.get("properties", {}).items():
        bad += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        bad += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        bad += _walk(schema["additionalProperties"], f"{path}{{}}")
    return bad


def test_schema_is_structural() -> None:
    assert _walk(SCHEMA) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_the_schema_and_the_operator(path: pathlib.Path) -> None:
    document = yaml.safe_load(path.read_text())
    validator().validate(document)
    assert document["kind"] == "ModelDeployment"
    assert specs.problems(specs.with_defaults(document["spec"])) == []


def test_there_are_cpu_gpu_and_tp2_examples() -> None:
    names = {path.name for path in EXAMPLES}
    assert names >= {"cpu-demo.yaml", "gpu-single.yaml", "gpu-tp2.yaml"}
    assert example("gpu-tp2.yaml")["spec"]["tensorParallelSize"] == 2


BROKEN = {
    "dtype not in enum": ("engine", {"dtype": "int4"}),
    "negative replicas": ("replicas", -1),
    "port out of range": ("service", {"port": 70000}),
    "autoscaling without max": ("autoscaling", {"minReplicas": 1}),
    "malformed hf repo": ("model", {"huggingFace": {"repo": "not a repo"}}),
    "relative model path": ("model", {"path": "models/x"}),
    "pvc without claim": ("model", {"pvc": {"subPath": "x"}}),
    "bad quantity": ("resources", {"requests": {"memory": "lots"}}),
    "unknown phase-like enum": ("engine", {"device": "tpu"}),
}


@pytest.mark.parametrize("case", BROKEN)
def test_schema_rejects_broken_specs(case: str) -> None:
    field, value = BROKEN[case]
    document = example("cpu-demo.yaml")
    document["spec"][field] = value
    errors = list(validator().iter_errors(document))
    assert errors, f"{case} was accepted"


def _rules(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    found = [(path, rule["rule"]) for rule in schema.get("x-kubernetes-validations", [])]
    for name, sub in schema.get("properties", {}).items():
        found += _rules(sub, (*path, name))
    return found


CEL_RULES = _rules(SCHEMA)


def cel_accepts(document: dict[str, Any]) -> bool:
    """Evaluate every CEL rule of the CRD on the object, as the API server would."""
    env = celpy.Environment()
    for path, rule in CEL_RULES:
        node: Any = document
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            program = env.program(env.compile(rule))
            if not program.evaluate({"self": celpy.json_to_cel(node)}):
                return False
    return True


CROSS_FIELD = {
    "tp without gpus": {"tensorParallelSize": 2},
    "tp not equal to gpus": {"resources": {"gpus": 4}, "tensorParallelSize": 2},
    "gpus without tp": {"resources": {"gpus": 2}},
    "two model sources": {"model": {"path": "/m", "url": "https://h/m.gguf"}},
    "min above max": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
    "extra args set the port": {"engine": {"extraArgs": ["--port", "8000"]}},
    "extra args set the drain": {
        "engine": {"extraArgs": ["--log-level", "debug", "--shutdown-timeout=5"]}
    },
}


def test_cel_rules_are_all_exercised() -> None:
    assert len(CEL_RULES) == 4


@pytest.mark.parametrize("case", CROSS_FIELD)
def test_cel_and_the_operator_reject_the_same_cross_field_mistakes(case: str) -> None:
    # The API server defaults before it validates; so does this test.
    document = {"spec": specs.with_defaults(CROSS_FIELD[case])}
    assert not cel_accepts(document)
    assert specs.problems(document["spec"])


def test_cel_and_the_operator_accept_flags_that_only_look_alike() -> None:
    document = {"spec": specs.with_defaults({"engine": {"extraArgs": ["--portal", "x=--port"]}})}
    assert cel_accepts(document)
    assert specs.problems(document["spec"]) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_cel_accepts_the_examples(path: pathlib.Path) -> None:
    document = yaml.safe_load(path.read_text())
    document["spec"] = specs.with_defaults(document["spec"])
    assert cel_accepts(document)


def test_defaults_come_from_the_schema() -> None:
    spec = specs.with_defaults({"autoscaling": {"maxReplicas": 3}})
    assert spec["replicas"] == 1
    assert spec["engine"]["shutdownTimeoutSeconds"] == 30
    assert spec["autoscaling"]["metric"] == "radixserve_num_queue_reqs"
    assert spec["service"] == {"type": "ClusterIP", "port": 80}
    original = {"engine": {"dtype": "float16"}}
    assert specs.with_defaults(copy.deepcopy(original))["engine"]["dtype"] == "float16"
    assert original == {"engine": {"dtype": "float16"}}  # the input is not modified
