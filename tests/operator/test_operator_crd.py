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
    "adapter without source": ("adapters", [{"name": "sql"}]),
    "adapter from a relative path": ("adapters", [{"name": "sql", "source": "adapters/sql"}]),
    "adapter from an hf repo without org": ("adapters", [{"name": "sql", "source": "hf://sql"}]),
    "adapter name with a slash": ("adapters", [{"name": "a/b", "source": "/models/a"}]),
    "keda without prometheus": ("autoscaling", {"maxReplicas": 2, "keda": {}}),
    "picker failure mode": ("inferencePool", {"picker": {"failureMode": "Maybe"}}),
    "gateway without name": ("inferencePool", {"gateway": {"namespace": "gw"}}),
    "zero nodes": ("parallelism", {"nodes": 0}),
}


def test_schema_accepts_every_adapter_source() -> None:
    document = example("cpu-demo.yaml")
    document["spec"]["adapters"] = [
        {"name": "cache", "source": "/models/adapters/sql-lora"},
        {"name": "hub", "source": "hf://org/sql-lora"},
        {"name": "hub-rev", "source": "hf://org/sql-lora@v2"},
        {"name": "web", "source": "https://example.com/adapters/sql.tar"},
    ]
    assert list(validator().iter_errors(document)) == []


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


def cel_accepts(document: dict[str, Any], old: dict[str, Any] | None = None) -> bool:
    """Evaluate every CEL rule of the CRD on the object, as the API server would: transition
    rules (those reading `oldSelf`) only on an update, where the field exists in both."""
    env = celpy.Environment()

    def at(root: dict[str, Any] | None, path: tuple[str, ...]) -> Any:
        node: Any = root
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    for path, rule in CEL_RULES:
        node, before = at(document, path), at(old, path)
        if node is None or ("oldSelf" in rule and before is None):
            continue
        context = {"self": celpy.json_to_cel(node)}
        if "oldSelf" in rule:
            context["oldSelf"] = celpy.json_to_cel(before)
        if not env.program(env.compile(rule)).evaluate(context):
            return False
    return True


def named(spec: dict[str, Any], name: str = "demo") -> dict[str, Any]:
    """A ModelDeployment as the API server validates it: defaulted, with its name."""
    return {"metadata": {"name": name}, "spec": specs.with_defaults(spec)}


CROSS_FIELD = {
    "tp without gpus": {"tensorParallelSize": 2},
    "tp not equal to gpus": {"resources": {"gpus": 4}, "tensorParallelSize": 2},
    "gpus without tp": {"resources": {"gpus": 2}},
    "two model sources": {"model": {"path": "/m", "url": "https://h/m.gguf"}},
    "min above max": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
    "zero replicas without keda": {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}},
    "nodes without gpus": {"parallelism": {"nodes": 2}},
    "tp not gpus times nodes": {
        "resources": {"gpus": 8},
        "tensorParallelSize": 8,
        "parallelism": {"nodes": 2},
    },
    "extra args set the port": {"engine": {"extraArgs": ["--port", "8000"]}},
    "extra args set the drain": {
        "engine": {"extraArgs": ["--log-level", "debug", "--shutdown-timeout=5"]}
    },
    # ReadWriteOnce mounts on one node: a second replica elsewhere fails with Multi-Attach.
    "rwo cache with autoscaling": {"modelCache": {}, "autoscaling": {"maxReplicas": 4}},
    "rwo cache with replicas": {"modelCache": {"accessMode": "ReadWriteOnce"}, "replicas": 2},
    "rwop cache with replicas": {"modelCache": {"accessMode": "ReadWriteOncePod"}, "replicas": 3},
}


def test_cel_rules_are_all_exercised() -> None:
    assert len(CEL_RULES) == 8


@pytest.mark.parametrize("case", CROSS_FIELD)
def test_cel_and_the_operator_reject_the_same_cross_field_mistakes(case: str) -> None:
    # The API server defaults before it validates; so does this test.
    document = named(CROSS_FIELD[case])
    assert not cel_accepts(document)
    assert specs.problems(document["spec"])


def test_cel_and_the_operator_accept_flags_that_only_look_alike() -> None:
    document = named({"engine": {"extraArgs": ["--portal", "x=--port"]}})
    assert cel_accepts(document)
    assert specs.problems(document["spec"]) == []


def test_multi_node_and_scale_to_zero_specs_are_accepted() -> None:
    for spec in (
        {"resources": {"gpus": 8}, "tensorParallelSize": 16, "parallelism": {"nodes": 2}},
        {
            "autoscaling": {
                "minReplicas": 0,
                "maxReplicas": 3,
                "keda": {"prometheusAddress": "http://prometheus.monitoring:9090"},
            }
        },
    ):
        assert cel_accepts(named(spec)), spec
        assert specs.problems(named(spec)["spec"]) == [], spec


def test_a_shared_cache_or_a_single_replica_may_use_its_access_mode() -> None:
    for spec in (
        {"modelCache": {"accessMode": "ReadWriteMany"}, "autoscaling": {"maxReplicas": 4}},
        {"modelCache": {}, "replicas": 1},
        {"modelCache": {}, "autoscaling": {"minReplicas": 1, "maxReplicas": 1}},
    ):
        assert cel_accepts(named(spec)), spec
        assert specs.problems(named(spec)["spec"]) == [], spec


# Valid custom-resource names (DNS-1123 subdomains) that no Service may carry.
BAD_NAMES = ["llama-3.1-8b", "3b-instruct", "a" * 64, "qwen3.coder", "trailing-"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_a_service_cannot_carry_are_refused_with_the_reason(name: str) -> None:
    assert not cel_accepts(named({}, name))
    (problem,) = specs.problems(named({}, name)["spec"], name)
    assert "DNS-1035 label" in problem and "Service is named after it" in problem
    suggested = problem.rsplit("e.g. ", 1)[1].strip("'")
    assert specs.name_problems(suggested) == []
    rule = next(r for r in SCHEMA["x-kubernetes-validations"] if "metadata.name" in r["rule"])
    assert "Service is named after it" in rule["message"]


@pytest.mark.parametrize("name", ["llama-3-1-8b", "m", "qwen3-32b", "a" * 63])
def test_names_that_are_dns_1035_labels_are_accepted(name: str) -> None:
    assert cel_accepts(named({}, name))
    assert specs.problems(named({}, name)["spec"], name) == []


@pytest.mark.parametrize(
    "change",
    [
        {"accessMode": "ReadWriteOncePod"},
        {"storageClassName": "fast"},
    ],
)
def test_the_cache_claims_immutable_fields_cannot_change(change: dict[str, str]) -> None:
    before = named({"modelCache": {"size": "10Gi", "accessMode": "ReadWriteOnce"}})
    after = copy.deepcopy(before)
    after["spec"]["modelCache"].update(change)
    assert cel_accepts(before) and cel_accepts(after)  # each fine as a new object
    assert not cel_accepts(after, old=before)
    grown = copy.deepcopy(before)
    grown["spec"]["modelCache"]["size"] = "20Gi"  # a PVC may grow: not refused here
    assert cel_accepts(grown, old=before)


def test_removing_a_storage_class_is_a_change_too() -> None:
    before = named({"modelCache": {"storageClassName": "fast"}})
    after = named({"modelCache": {}})
    assert not cel_accepts(after, old=before)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_cel_accepts_the_examples(path: pathlib.Path) -> None:
    document = yaml.safe_load(path.read_text())
    document["spec"] = specs.with_defaults(document["spec"])
    assert cel_accepts(document)
    assert cel_accepts(document, old=document)  # re-applying it unchanged is allowed


def test_defaults_come_from_the_schema() -> None:
    spec = specs.with_defaults({"autoscaling": {"maxReplicas": 3}})
    assert spec["replicas"] == 1
    assert spec["engine"]["shutdownTimeoutSeconds"] == 30
    assert spec["autoscaling"]["metric"] == "radixserve_num_queue_reqs"
    assert spec["service"] == {"type": "ClusterIP", "port": 80}
    original = {"engine": {"dtype": "float16"}}
    assert specs.with_defaults(copy.deepcopy(original))["engine"]["dtype"] == "float16"
    assert original == {"engine": {"dtype": "float16"}}  # the input is not modified
