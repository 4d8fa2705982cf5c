"""Manifest builders: every spec variant renders objects Kubernetes' own schemas accept."""

from __future__ import annotations

import argparse
from typing import Any

import kubernetes_validate
import pytest
from radixserve.config import ServerArgs
from radixserve_operator import manifests
from radixserve_operator import spec as specs
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


def pods() -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            variant,
            manifests.deployment("demo", "ml", with_defaults(raw))["spec"]["template"]["spec"],
        )
        for variant, raw in VARIANTS.items()
    ]


@pytest.mark.parametrize("variant, pod", pods(), ids=list(VARIANTS))
def test_every_container_is_locked_down(variant: str, pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == manifests.UID != 0
    assert pod["securityContext"]["runAsGroup"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False  # the server never calls the API
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    containers = pod["containers"] + pod.get("initContainers", [])
    assert len(containers) == (2 if variant in ("hf-tp2-everything", "url-gguf") else 1)
    for container in containers:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert "privileged" not in context and "add" not in context["capabilities"]
        # A read-only root: every place the process writes is a writable volume.
        writable = {
            m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly", False)
        }
        assert {"/tmp", manifests.CACHE_DIR} <= writable
        env = {e["name"]: e.get("value") for e in container["env"]}
        for name in ("HOME", "HF_HOME", "XDG_CACHE_HOME"):
            if name in env:
                assert any(env[name].startswith(path) for path in writable), name
        for mount in container["volumeMounts"]:
            # Volume types the restricted Pod Security Standard allows (no hostPath).
            assert set(volumes[mount["name"]]) - {"name"} <= {"emptyDir", "persistentVolumeClaim"}
    server = pod["containers"][0]
    assert "/dev/shm" in {m["mountPath"] for m in server["volumeMounts"]}  # NCCL, torch


DRAINS = [0, 30, 600]


@pytest.mark.parametrize("drain", DRAINS)
def test_grace_period_covers_prestop_drain_and_exit(drain: int) -> None:
    spec = with_defaults({"engine": {"shutdownTimeoutSeconds": drain}})
    pod = manifests.deployment("demo", "ml", spec)["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert flag(server["args"], "--shutdown-timeout") == str(drain)
    assert server["args"].count("--shutdown-timeout") == 1
    sleep = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep == manifests.PRESTOP_SLEEP_SECONDS > 0
    # The kubelet counts the grace period from the start of preStop; SIGTERM comes after
    # it; the server then drains for up to --shutdown-timeout and needs time to exit.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace == sleep + drain + manifests.EXIT_MARGIN_SECONDS
    assert grace - sleep - drain >= 15  # uvicorn's 5 s close + the engine's 10 s join
    # Probes keep reading /health, which turns 503 at SIGTERM, so readiness drops at once.
    assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def serve_args(raw: dict[str, Any]) -> Any:
    """The container's arguments as the real `radixserve serve` reads them."""
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    server = container(raw)
    assert server["command"] == ["radixserve", "serve"]
    return ServerArgs.from_cli(parser.parse_args(server["args"]), environ={})


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_server_reads_the_flags_the_operator_passes(variant: str) -> None:
    spec = with_defaults(VARIANTS[variant])
    args = serve_args(VARIANTS[variant])
    assert args.shutdown_timeout == spec["engine"]["shutdownTimeoutSeconds"]
    assert args.port == manifests.SERVER_PORT == container({})["ports"][0]["containerPort"]
    assert args.host == "0.0.0.0"
    assert args.served_model_name == manifests.served_model_name("demo", spec)


def test_the_crd_default_drain_is_the_servers() -> None:
    default = with_defaults({})["engine"]["shutdownTimeoutSeconds"]
    assert default == ServerArgs().shutdown_timeout == serve_args({}).shutdown_timeout


def test_extra_args_cannot_take_over_the_drain_or_the_port() -> None:
    for extra in (["--shutdown-timeout", "5"], ["--shutdown-timeout=5"], ["--port", "8000"]):
        problems = specs.problems(with_defaults({"engine": {"extraArgs": extra}}))
        assert len(problems) == 1 and extra[0].split("=")[0] in problems[0], extra
    assert specs.problems(with_defaults({"engine": {"extraArgs": ["--log-level", "debug"]}})) == []


def test_pod_has_no_service_links() -> None:
    pod = manifests.deployment("demo", "ml", with_defaults({}))["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    server = pod["containers"][0]
    assert server["startupProbe"]["failureThreshold"] == 180
    assert "initialDelaySeconds" not in server["startupProbe"]


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


def test_progress_deadline_outlasts_the_startup_budget() -> None:
    """A slow first load must not read as a stalled rollout (Kubernetes' default is 600 s)."""
    dep = manifests.deployment("demo", "ml", with_defaults({}))
    assert dep["spec"]["progressDeadlineSeconds"] == 10 * 180 + 600
    slow = with_defaults({"probes": {"startup": {"failureThreshold": 360}}})
    assert manifests.deployment("demo", "ml", slow)["spec"]["progressDeadlineSeconds"] == 4200


def test_liveness_has_its_own_endpoint_and_readiness_stays_strict() -> None:
    container = manifests.deployment("demo", "ml", with_defaults({}))["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
