"""Manifest builders: every spec variant renders objects Kubernetes' own schemas accept."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from radixserve_operator import manifests
from radixserve_operator.spec import with_defaults

K8S_VERSION = "1.33.0"  # a recent release whose schemas kubernetes-validate ships

VARIANTS: dict[str, dict[str, Any]] = {
    "cpu-default-model": {},
    "image-path": {"model": {"path": "/models/smollm2"}, "replicas": 2},
    "pvc-gpu": {
        "model": {"pvc": {"claimName": "weights", "subPath": "llama-3-8b"}, "servedName": "llama"},
        "resources": {"gpus": 1, "requests": {"cpu": "4", "memory": "32Gi"}},
        "engine": {"dtype": "bfloat16", "contextLength": 8192, "memFractionStatic": 0.85},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "nodeSelector": {"gpu": "h100"},
    },
    "hf-tp2-everything": {
        "model": {
            "huggingFace": {
                "repo": "Qwen/Qwen3-8B",
                "revision": "main",
                "tokenSecretRef": {"name": "hf", "key": "token"},
            }
        },
        "resources": {"gpus": 2, "limits": {"memory": "64Gi"}},
        "tensorParallelSize": 2,
        "apiKeySecretRef": {"name": "keys"},
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        "podAnnotations": {"prometheus.io/scrape": "true"},
        "service": {"type": "LoadBalancer", "port": 8000, "annotations": {"a": "b"}},
        "probes": {"startup": {"failureThreshold": 360}},
        "rollout": {"maxSurge": 0, "maxUnavailable": 1},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 8, "targetAverageValue": "2"},
        "modelCache": {"size": "100Gi", "storageClassName": "fast", "accessMode": "ReadWriteMany"},
        "inferencePool": {"endpointPickerRef": {"name": "epp", "port": 9002}},
        "engine": {"extraArgs": ["--log-level", "debug"], "disableRadixCache": True},
        "image": {"pullSecrets": ["regcred"]},
    },
    "url-gguf": {"model": {"url": "https://example.com/models/smollm2.Q8_0.gguf"}},
}


def render(name: str, raw: dict[str, Any]) -> list[dict[str, Any]]:
    return manifests.children(name, "ml", with_defaults(raw))


@pytest.mark.parametrize("variant", VARIANTS)
def test_children_pass_kubernetes_schemas(variant: str) -> None:
    checked = 0
    for manifest in render("demo", VARIANTS[variant]):
        if manifest["kind"] == "InferencePool":
            continue  # a CRD kubernetes-validate has no schema for; see the test below
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 3


def test_inference_pool_has_the_v1_shape() -> None:
    pool = next(
        m for m in render("demo", VARIANTS["hf-tp2-everything"]) if m["kind"] == "InferencePool"
    )
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"] == {
        "selector": {"matchLabels": manifests.selector("demo")},
        "targetPorts": [{"number": 30000}],
        "endpointPickerRef": {
            "kind": "Service",
            "name": "epp",
            "port": {"number": 9002},
            "failureMode": "FailClose",
        },
    }


def container(raw: dict[str, Any]) -> dict[str, Any]:
    deployment = manifests.deployment("demo", "ml", with_defaults(raw))
    return deployment["spec"]["template"]["spec"]["containers"][0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_server_flags_follow_the_spec() -> None:
    args = container(VARIANTS["pvc-gpu"])["args"]
    assert flag(args, "--model") == "/mnt/model/llama-3-8b"
    assert flag(args, "--served-model-name") == "llama"
    assert flag(args, "--port") == "30000"
    assert flag(args, "--host") == "0.0.0.0"
    assert flag(args, "--dtype") == "bfloat16"
    assert flag(args, "--context-length") == "8192"
    assert flag(args, "--mem-fraction-static") == "0.85"
    assert flag(args, "--tp-size") == "1"
    assert "--disable-radix-cache" not in args


def test_every_model_source_resolves_to_a_path() -> None:
    assert "--model" not in container({})["args"]
    assert flag(container(VARIANTS["image-path"])["args"], "--model") == "/models/smollm2"
    hf = container(VARIANTS["hf-tp2-everything"])["args"]
    assert flag(hf, "--model") == "/models/Qwen--Qwen3-8B"
    assert hf[-2:] == ["--log-level", "debug"]  # extra args come last, so they win
    url = container(VARIANTS["url-gguf"])["args"]
    assert flag(url, "--model") == "/models/smollm2.Q8_0.gguf"


def test_downloads_run_in_an_init_container_on_the_shared_volume() -> None:
    spec = with_defaults(VARIANTS["hf-tp2-everything"])
    pod = manifests.deployment("demo", "ml", spec)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][-3:] == ["Qwen/Qwen3-8B", "main", "/models/Qwen--Qwen3-8B"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in (
        init["env"]
    )
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"]["claimName"] == "demo-model-cache"
    assert "nvidia.com/gpu" not in init["resources"].get("limits", {})
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    url_pod = manifests.deployment("demo", "ml", with_defaults(VARIANTS["url-gguf"]))
    url_volumes = url_pod["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "emptyDir": {}} in url_volumes


def test_pod_is_locked_down_and_drains() -> None:
    deployment = manifests.deployment("demo", "ml", with_defaults({}))
    pod = deployment["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {m["mountPath"] for m in server["volumeMounts"]} >= {"/tmp", "/cache", "/dev/shm"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["startupProbe"]["failureThreshold"] == 180
    assert "initialDelaySeconds" not in server["startupProbe"]
    # 30s drain + 5s preStop + margin, so in-flight requests finish before SIGKILL.
    assert flag(server["args"], "--shutdown-timeout") == "30"
    assert pod["terminationGracePeriodSeconds"] > 30 + manifests.PRESTOP_SLEEP_SECONDS
    assert server["lifecycle"]["preStop"] == {"sleep": {"seconds": manifests.PRESTOP_SLEEP_SECONDS}}
    assert pod["enableServiceLinks"] is False


def test_probe_overrides_keep_the_other_defaults() -> None:
    probe = container({"probes": {"startup": {"failureThreshold": 360}}})["startupProbe"]
    assert probe["failureThreshold"] == 360
    assert probe["periodSeconds"] == manifests.DEFAULT_PROBES["startup"]["periodSeconds"]


def test_user_env_overrides_ours() -> None:
    env = container({"env": [{"name": "HOME", "value": "/work"}]})["env"]
    assert [e for e in env if e["name"] == "HOME"] == [{"name": "HOME", "value": "/work"}]


def test_labels_and_selector_follow_the_contract() -> None:
    for manifest in render("demo", VARIANTS["hf-tp2-everything"]):
        assert manifest["metadata"]["labels"] == {
            "app.kubernetes.io/name": "radixserve",
            "app.kubernetes.io/instance": "demo",
            "app.kubernetes.io/managed-by": "radixserve-operator",
        }
    service = manifests.service("demo", "ml", with_defaults({}))
    assert service["spec"]["selector"] == manifests.selector("demo")


def test_optional_children_appear_only_when_asked() -> None:
    kinds = {m["kind"] for m in render("demo", {})}
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget"}
    kinds = {m["kind"] for m in render("demo", VARIANTS["hf-tp2-everything"])}
    assert kinds >= {"PersistentVolumeClaim", "HorizontalPodAutoscaler", "InferencePool"}


def test_hpa_scales_the_model_deployment_on_a_radixserve_metric() -> None:
    hpa = manifests.hpa("demo", "ml", with_defaults(VARIANTS["hf-tp2-everything"]))
    assert hpa is not None
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "ModelDeployment"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "radixserve_num_queue_reqs"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "2"}
