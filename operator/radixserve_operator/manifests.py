"""Manifest builders: a defaulted ModelDeployment spec in, Kubernetes objects out.

Pure functions, no API calls, so every variant is testable offline and the handlers only
apply what these return. The server's contract (flags, port, /health, SIGTERM drain) is
DESIGN.md's; nothing here imports the server.
"""

from __future__ import annotations

import posixpath
from typing import Any

from . import GROUP, KIND, VERSION
from .spec import Spec

Manifest = dict[str, Any]

SERVER_PORT = 30000
MODELS_DIR = "/models"
PVC_MOUNT = "/mnt/model"
CACHE_DIR = "/cache"
# Termination, in the kubelet's order (docs/kubernetes.md, "Drain timing"):
#   preStop sleep: the pod is already out of the Service's endpoints, but kube-proxy and
#     gateways take a moment to notice, so the server keeps serving what still arrives;
#   SIGTERM: the server drains, /health and new requests 503, in-flight requests finish,
#     for up to --shutdown-timeout (spec.engine.shutdownTimeoutSeconds);
#   exit: the server closes its connections (uvicorn allows 5 s) and stops its engine
#     process (joined for up to 10 s), then exits 0.
# terminationGracePeriodSeconds covers all three, so SIGKILL never cuts a drain short.
PRESTOP_SLEEP_SECONDS = 5
EXIT_MARGIN_SECONDS = 15
UID = 1000
# Multi-node: rank 0 (the LeaderWorkerSet's leader) listens here for the other ranks.
DIST_INIT_PORT = 29500
# Labels LeaderWorkerSet puts on its pods; the leader of each group has worker index 0.
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
# The endpoint picker (Gateway API Inference Extension) reads this pod label to know which
# metric names a model server exports. Ours exports vLLM's names (queue, running, KV-cache
# usage, cache config, LoRA info) beside radixserve_*, so the picker's defaults apply.
ENGINE_TYPE_LABEL = "inference.networking.k8s.io/engine-type"
ENGINE_TYPE = "vllm"
# The picker's defaults (epp v1.0) read these metric names, which the server exports.
PICKER_METRICS = {
    "queued requests": "vllm:num_requests_waiting",
    "running requests": "vllm:num_requests_running",
    "KV-cache usage (0-1)": "vllm:kv_cache_usage_perc",
    "cache config (block_size, num_gpu_blocks)": "vllm:cache_config_info",
    "LoRA adapters (max_lora, running/waiting_lora_adapters)": "vllm:lora_requests_info",
}
# The endpoint picker's image when neither the spec nor the operator's setting names one.
DEFAULT_PICKER_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.0.0"
PICKER_GRPC_PORT = 9002
PICKER_HEALTH_PORT = 9003
PICKER_METRICS_PORT = 9090

DEFAULT_PROBES: dict[str, dict[str, int]] = {
    # Loading a large model can take many minutes: a long failureThreshold (not an
    # initialDelay) lets a fast start become ready at once while a slow one is not killed.
    "startup": {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 180},
    "readiness": {"periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
    # On /health/live, which fails only once the engine died or the server's own watchdog
    # fired: a long engine step (a big prefill on a CPU) turns /health 503 for a while,
    # which readiness should see, but restarting the pod would lose the whole batch.
    "liveness": {"periodSeconds": 15, "timeoutSeconds": 10, "failureThreshold": 6},
}
# startup and readiness call /health (strict); liveness the looser /health/live.
PROBE_PATHS = {"startup": "/health", "readiness": "/health", "liveness": "/health/live"}
# Beyond the startup probe's budget: scheduling, the image pull and the model download
# (an init container runs before any probe starts).
PROGRESS_MARGIN_SECONDS = 600

HF_DOWNLOAD = (
    "import sys\n"
    "from huggingface_hub import snapshot_download\n"
    "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3])\n"
)
URL_DOWNLOAD = (
    "import os, sys, urllib.request\n"
    "url, dest = sys.argv[1], sys.argv[2]\n"
    "if not os.path.exists(dest):\n"
    "    urllib.request.urlretrieve(url, dest + '.part')\n"
    "    os.replace(dest + '.part', dest)\n"
)


def labels(name: str) -> dict[str, str]:
    """The labels DESIGN.md puts on everything the operator creates."""
    return {
        "app.kubernetes.io/name": "radixserve",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "radixserve-operator",
    }


def selector(name: str) -> dict[str, str]:
    """Pod selector; a Deployment's selector is immutable, so it never grows."""
    return {"app.kubernetes.io/name": "radixserve", "app.kubernetes.io/instance": name}


def pod_labels(name: str) -> dict[str, str]:
    """The serving pods' labels: the contract's, plus the one the endpoint picker reads."""
    return {**labels(name), ENGINE_TYPE_LABEL: ENGINE_TYPE}


def multi_node(spec: Spec) -> bool:
    return spec["parallelism"]["nodes"] > 1


def serving_selector(name: str, spec: Spec) -> dict[str, str]:
    """The pods that answer HTTP: all of them, or only each group's leader when multi-node."""
    if multi_node(spec):
        return {**selector(name), LWS_WORKER_INDEX_LABEL: "0"}
    return selector(name)


def selector_string(name: str) -> str:
    """The selector as the scale subresource's labelSelectorPath expects it."""
    return ",".join(f"{key}={value}" for key, value in selector(name).items())


def served_model_name(name: str, spec: Spec) -> str:
    return spec["model"].get("servedName") or name


def endpoint(name: str, namespace: str, spec: Spec) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:{spec['service']['port']}/v1"


def model_cache_claim_name(name: str) -> str:
    return f"{name}-model-cache"


def _model_path(spec: Spec) -> str | None:
    """Where the server finds the weights, or None for its built-in default model."""
    model = spec["model"]
    if "path" in model:
        return model["path"]
    if "pvc" in model:
        return posixpath.join(PVC_MOUNT, model["pvc"]["subPath"]).rstrip("/")
    if "huggingFace" in model:
        return posixpath.join(MODELS_DIR, model["huggingFace"]["repo"].replace("/", "--"))
    if "url" in model:
        return posixpath.join(MODELS_DIR, posixpath.basename(model["url"]))
    return None


def _downloads(spec: Spec) -> bool:
    return "huggingFace" in spec["model"] or "url" in spec["model"]


def server_args(name: str, spec: Spec, node_rank: str = "0") -> list[str]:
    """`radixserve serve` flags for the spec (DESIGN.md's contract).

    Multi-node, every pod of a group gets `--nnodes`, `--dist-init-addr` (the leader's
    address, from LeaderWorkerSet's environment) and its `--node-rank`, which the kubelet
    expands from `$(LWS_WORKER_INDEX)` for the workers.
    """
    engine = spec["engine"]
    args = ["--host", "0.0.0.0", "--port", str(SERVER_PORT)]
    model_path = _model_path(spec)
    if model_path is not None:
        args += ["--model", model_path]
    args += ["--served-model-name", served_model_name(name, spec)]
    args += ["--tp-size", str(spec["tensorParallelSize"])]
    args += ["--dtype", engine["dtype"], "--device", engine["device"]]
    args += ["--attention-backend", engine["attentionBackend"]]
    optional = {
        "contextLength": "--context-length",
        "maxRunningRequests": "--max-running-requests",
        "maxTotalTokens": "--max-total-tokens",
        "chunkedPrefillSize": "--chunked-prefill-size",
        "memFractionStatic": "--mem-fraction-static",
        "maxLoras": "--max-loras",
        "maxLoraRank": "--max-lora-rank",
    }
    for field, flag in optional.items():
        if field in engine:
            args += [flag, str(engine[field])]
    if engine["disableRadixCache"]:
        args.append("--disable-radix-cache")
    args += ["--shutdown-timeout", str(engine["shutdownTimeoutSeconds"])]
    args += ["--log-level", engine["logLevel"]]
    if spec.get("adapters"):
        args += ["--lora-paths", *adapter_args(spec["adapters"])]
    if multi_node(spec):
        args += ["--nnodes", str(spec["parallelism"]["nodes"]), "--node-rank", node_rank]
        args += ["--dist-init-addr", f"$(LWS_LEADER_ADDRESS):{DIST_INIT_PORT}"]
    return args + list(engine.get("extraArgs", []))


def adapter_args(adapters: list[dict[str, str]]) -> list[str]:
    """`--lora-paths` values: NAME=SOURCE, the server resolving hf:// and URLs itself."""
    return [f"{adapter['name']}={adapter['source']}" for adapter in adapters]


def termination_grace_seconds(spec: Spec) -> int:
    """preStop sleep + the server's drain (--shutdown-timeout) + its exit."""
    return PRESTOP_SLEEP_SECONDS + spec["engine"]["shutdownTimeoutSeconds"] + EXIT_MARGIN_SECONDS


def _probe(kind: str, spec: Spec) -> dict[str, Any]:
    timings = DEFAULT_PROBES[kind] | spec["probes"].get(kind, {})
    return {"httpGet": {"path": PROBE_PATHS[kind], "port": "http"}, **timings}


def progress_deadline_seconds(spec: Spec) -> int:
    """How long a rollout may go without progress before the Deployment calls it stalled.

    Kubernetes' 600 s default is shorter than the startup probe lets a model load (30 min
    by default), so a slow first load would read as a stalled rollout (Degraded). This is
    the startup budget plus a margin for scheduling, the image pull and the download.
    """
    startup = _probe("startup", spec)
    budget = startup.get("initialDelaySeconds", 0) + (
        startup["periodSeconds"] * startup["failureThreshold"]
    )
    return budget + PROGRESS_MARGIN_SECONDS


def _resources(spec: Spec, with_gpus: bool) -> dict[str, Any]:
    res = spec["resources"]
    out: dict[str, Any] = {}
    for key in ("requests", "limits"):
        values = dict(res.get(key, {}))
        if with_gpus and res["gpus"]:
            values[res["gpuResourceName"]] = res["gpus"]
        if values:
            out[key] = values
    return out


def _env(spec: Spec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
    ]
    ref = spec.get("apiKeySecretRef")
    if ref:
        env.append(
            {
                "name": "RADIXSERVE_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}},
            }
        )
    user = spec.get("env", [])
    overridden = {item["name"] for item in user}
    return [item for item in env if item["name"] not in overridden] + list(user)


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _volumes(name: str, spec: Spec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pod volumes and the server's mounts: writable scratch on a read-only root."""
    # Tensor parallelism exchanges activations through shared memory (NCCL).
    shm = "2Gi" if spec["tensorParallelSize"] > 1 else "512Mi"
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    model = spec["model"]
    if "pvc" in model:
        volumes.append(
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": model["pvc"]["claimName"], "readOnly": True},
            }
        )
        mounts.append({"name": "model", "mountPath": PVC_MOUNT, "readOnly": True})
    if _downloads(spec):
        if "modelCache" in spec:
            claim = {"claimName": model_cache_claim_name(name)}
            volumes.append({"name": "models", "persistentVolumeClaim": claim})
        else:
            volumes.append({"name": "models", "emptyDir": {}})
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    return volumes, mounts


def _init_containers(spec: Spec, image: str, pull_policy: str) -> list[dict[str, Any]]:
    """A downloader that fills the shared models volume before the server starts."""
    model = spec["model"]
    dest = _model_path(spec)
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
    ]
    if "huggingFace" in model:
        hf = model["huggingFace"]
        command = ["python", "-c", HF_DOWNLOAD, hf["repo"], hf["revision"], dest]
        token = hf.get("tokenSecretRef")
        if token:
            ref = {"name": token["name"], "key": token["key"]}
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    elif "url" in model:
        command = ["python", "-c", URL_DOWNLOAD, model["url"], dest]
    else:
        return []
    return [
        {
            "name": "download-model",
            "image": image,
            "imagePullPolicy": pull_policy,
            "command": command,
            "env": env,
            "resources": _resources(spec, with_gpus=False),
            "securityContext": _security_context(),
            "volumeMounts": [
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "cache", "mountPath": CACHE_DIR},
                {"name": "models", "mountPath": MODELS_DIR},
            ],
        }
    ]


def _server_container(name: str, spec: Spec, node_rank: str = "0") -> dict[str, Any]:
    """The server container; a multi-node worker (rank above 0) serves no HTTP, so it has
    no port and no probes: its group's leader answers for it."""
    image_spec = spec["image"]
    _, mounts = _volumes(name, spec)
    container: dict[str, Any] = {
        "name": "server",
        "image": f"{image_spec['repository']}:{image_spec['tag']}",
        "imagePullPolicy": image_spec["pullPolicy"],
        "command": ["radixserve", "serve"],
        "args": server_args(name, spec, node_rank),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "env": _env(spec),
        "resources": _resources(spec, with_gpus=True),
        "startupProbe": _probe("startup", spec),
        "readinessProbe": _probe("readiness", spec),
        "livenessProbe": _probe("liveness", spec),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }
    if multi_node(spec) and node_rank == "0":
        dist = {"name": "dist", "containerPort": DIST_INIT_PORT, "protocol": "TCP"}
        container["ports"].append(dist)
    if node_rank != "0":
        for field in ("ports", "startupProbe", "readinessProbe", "livenessProbe"):
            del container[field]
    return container


def _pod_template(name: str, spec: Spec, node_rank: str = "0") -> dict[str, Any]:
    image_spec = spec["image"]
    image = f"{image_spec['repository']}:{image_spec['tag']}"
    volumes, _ = _volumes(name, spec)
    pod_spec: dict[str, Any] = {
        # A Service named like a RADIXSERVE_* flag would otherwise inject RADIXSERVE_PORT etc.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": _init_containers(spec, image, image_spec["pullPolicy"]),
        "containers": [_server_container(name, spec, node_rank)],
        "volumes": volumes,
    }
    if not pod_spec["initContainers"]:
        del pod_spec["initContainers"]
    for field in ("nodeSelector", "tolerations", "affinity"):
        if spec.get(field):
            pod_spec[field] = spec[field]
    if image_spec.get("pullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": s} for s in image_spec["pullSecrets"]]
    template_meta: dict[str, Any] = {"labels": pod_labels(name)}
    if spec.get("podAnnotations"):
        template_meta["annotations"] = dict(spec["podAnnotations"])
    return {"metadata": template_meta, "spec": pod_spec}


def deployment(name: str, namespace: str, spec: Spec) -> Manifest | None:
    """The serving pods of a single-node model (multi-node: `leader_worker_set`)."""
    if multi_node(spec):
        return None
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "replicas": spec["replicas"],
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": progress_deadline_seconds(spec),
            "selector": {"matchLabels": selector(name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {
                    "maxSurge": spec["rollout"]["maxSurge"],
                    "maxUnavailable": spec["rollout"]["maxUnavailable"],
                },
            },
            "template": _pod_template(name, spec),
        },
    }


def leader_worker_set(name: str, namespace: str, spec: Spec) -> Manifest | None:
    """A multi-node model: each replica is a group of `parallelism.nodes` pods.

    The leader (index 0) serves HTTP and carries the probes; workers join it through the
    environment LeaderWorkerSet injects (LWS_LEADER_ADDRESS, LWS_WORKER_INDEX). A pod that
    fails restarts its whole group, since the ranks' collectives cannot take a new member;
    `spec.replicas` (and so `kubectl scale md`) counts groups.
    """
    if not multi_node(spec):
        return None
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "replicas": spec["replicas"],
            # Workers start with the leader, not after it is ready: it becomes ready only
            # once they joined.
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {
                    "maxSurge": spec["rollout"]["maxSurge"],
                    "maxUnavailable": spec["rollout"]["maxUnavailable"],
                },
            },
            "leaderWorkerTemplate": {
                "size": spec["parallelism"]["nodes"],
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": _pod_template(name, spec, "0"),
                "workerTemplate": _pod_template(name, spec, "$(LWS_WORKER_INDEX)"),
            },
        },
    }


def service(name: str, namespace: str, spec: Spec) -> Manifest:
    svc = spec["service"]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels(name)}
    if svc.get("annotations"):
        metadata["annotations"] = dict(svc["annotations"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": svc["type"],
            "selector": serving_selector(name, spec),
            "ports": [
                {
                    "name": "http",
                    "port": svc["port"],
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def model_cache_pvc(name: str, namespace: str, spec: Spec) -> Manifest | None:
    cache = spec.get("modelCache")
    if cache is None:
        return None
    pvc_spec: dict[str, Any] = {
        "accessModes": [cache["accessMode"]],
        "resources": {"requests": {"storage": cache["size"]}},
    }
    if cache.get("storageClassName"):
        pvc_spec["storageClassName"] = cache["storageClassName"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": model_cache_claim_name(name),
            "namespace": namespace,
            "labels": labels(name),
        },
        "spec": pvc_spec,
    }


def hpa(name: str, namespace: str, spec: Spec) -> Manifest | None:
    """An HPA on the ModelDeployment's scale subresource, so replicas have one owner."""
    scaling = spec.get("autoscaling")
    if scaling is None or "keda" in scaling:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "scaleTargetRef": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name},
            "minReplicas": scaling["minReplicas"],
            "maxReplicas": scaling["maxReplicas"],
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": scaling["metric"]},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": scaling["targetAverageValue"],
                        },
                    },
                }
            ],
        },
    }


def pdb(name: str, namespace: str, spec: Spec) -> Manifest:
    """Voluntary disruptions (node drains) take one replica at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(name)},
            # A pod stuck loading or crash-looping must not block a drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def load_query(name: str, namespace: str) -> str:
    """PromQL: the model's queued plus running requests, over the Service's scraped pods."""
    where = f'namespace="{namespace}",service="{name}"'
    return (
        f"sum(radixserve_num_queue_reqs{{{where}}}) + sum(radixserve_num_running_reqs{{{where}}})"
    )


def scaled_object(name: str, namespace: str, spec: Spec) -> Manifest | None:
    """A KEDA ScaledObject on the ModelDeployment's scale subresource (replaces the HPA).

    KEDA drives an HPA of its own between 1 and maxReplicas on the load per replica, and
    itself takes the replicas between 0 and 1: to zero once the load stayed at or below the
    activation threshold for the cooldown, back to one when it rises above it.
    """
    scaling = spec.get("autoscaling")
    if scaling is None or "keda" not in scaling:
        return None
    keda = scaling["keda"]
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "scaleTargetRef": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name},
            "minReplicaCount": scaling["minReplicas"],
            "maxReplicaCount": scaling["maxReplicas"],
            "pollingInterval": keda["pollingIntervalSeconds"],
            "cooldownPeriod": keda["cooldownSeconds"],
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": keda["prometheusAddress"],
                        "query": keda.get("query") or load_query(name, namespace),
                        "threshold": scaling["targetAverageValue"],
                        "activationThreshold": keda["activationThreshold"],
                        # No pods, no series: read as no load rather than an error.
                        "ignoreNullValues": "true",
                    },
                }
            ],
        },
    }


def picker_name(name: str) -> str:
    return f"{name}-epp"


def runs_picker(spec: Spec) -> bool:
    pool = spec.get("inferencePool")
    return pool is not None and "endpointPickerRef" not in pool


def inference_pool(name: str, namespace: str, spec: Spec) -> Manifest | None:
    pool = spec.get("inferencePool")
    if pool is None:
        return None
    if runs_picker(spec):
        picker_ref = {
            "name": picker_name(name),
            "port": PICKER_GRPC_PORT,
            "failureMode": pool["picker"]["failureMode"],
        }
    else:
        picker_ref = pool["endpointPickerRef"]
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "selector": {"matchLabels": serving_selector(name, spec)},
            "targetPorts": [{"number": SERVER_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": picker_ref["name"],
                "port": {"number": picker_ref["port"]},
                "failureMode": picker_ref["failureMode"],
            },
        },
    }


def _picker_pod_labels(name: str) -> dict[str, str]:
    """Not the serving pods' `app.kubernetes.io/name`: the model's Service, pool, PDB and
    Deployment select on that, and must never pick the picker."""
    return {
        "app.kubernetes.io/name": "radixserve-endpoint-picker",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "radixserve-operator",
    }


# What the picker reads: the pool, the serving pods it scores, and objectives naming
# per-request priorities (inference.networking.x-k8s.io).
PICKER_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {
        "apiGroups": ["inference.networking.k8s.io"],
        "resources": ["inferencepools"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["inference.networking.x-k8s.io"],
        "resources": ["inferenceobjectives"],
        "verbs": ["get", "list", "watch"],
    },
]


def picker_objects(name: str, namespace: str, spec: Spec) -> list[Manifest]:
    """The endpoint picker the pool names: ServiceAccount, Role and binding, Deployment,
    Service. It runs with the picker's own default metric names (PICKER_METRICS)."""
    if not runs_picker(spec):
        return []
    picker = spec["inferencePool"]["picker"]
    epp = picker_name(name)

    def meta(kind_name: str = epp) -> dict[str, Any]:
        return {"name": kind_name, "namespace": namespace, "labels": labels(name)}

    args = ["--pool-name", name, "--pool-namespace", namespace, "--zap-encoder", "json"]
    args += ["--grpc-port", str(PICKER_GRPC_PORT)]
    args += ["--grpc-health-port", str(PICKER_HEALTH_PORT)]
    args += ["--metrics-port", str(PICKER_METRICS_PORT)]
    health = {"grpc": {"port": PICKER_HEALTH_PORT, "service": "inference-extension"}}
    container = {
        "name": "epp",
        "image": picker.get("image") or DEFAULT_PICKER_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "args": args + list(picker.get("extraArgs", [])),
        "ports": [
            {"name": "grpc", "containerPort": PICKER_GRPC_PORT, "protocol": "TCP"},
            {"name": "grpc-health", "containerPort": PICKER_HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": PICKER_METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {**health, "periodSeconds": 5},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": _security_context(),
    }
    pod_labels_ = _picker_pod_labels(name)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta()},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(),
            "rules": PICKER_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": epp},
            "subjects": [{"kind": "ServiceAccount", "name": epp, "namespace": namespace}],
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(),
            "spec": {
                "replicas": picker["replicas"],
                "selector": {"matchLabels": pod_labels_},
                "template": {
                    "metadata": {"labels": pod_labels_},
                    "spec": {
                        "serviceAccountName": epp,
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": UID,
                            "runAsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [container],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(),
            "spec": {
                "type": "ClusterIP",
                "selector": pod_labels_,
                "ports": [
                    {
                        "name": "grpc-ext-proc",
                        "port": PICKER_GRPC_PORT,
                        "targetPort": "grpc",
                        "protocol": "TCP",
                        "appProtocol": "http2",
                    },
                    {
                        "name": "http-metrics",
                        "port": PICKER_METRICS_PORT,
                        "targetPort": "metrics",
                        "protocol": "TCP",
                    },
                ],
            },
        },
    ]


def http_route(name: str, namespace: str, spec: Spec) -> Manifest | None:
    """Route a Gateway's requests to the InferencePool (the picker chooses the pod)."""
    gateway = (spec.get("inferencePool") or {}).get("gateway")
    if gateway is None:
        return None
    parent: dict[str, Any] = {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": gateway["name"],
    }
    for field in ("namespace", "sectionName"):
        if gateway.get(field):
            parent[field] = gateway[field]
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "parentRefs": [parent],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {
                            "group": "inference.networking.k8s.io",
                            "kind": "InferencePool",
                            "name": name,
                        }
                    ],
                }
            ],
        },
    }


def children(name: str, namespace: str, spec: Spec) -> list[Manifest]:
    """Everything one ModelDeployment owns, in the order to apply it."""
    built = [
        model_cache_pvc(name, namespace, spec),
        deployment(name, namespace, spec),
        leader_worker_set(name, namespace, spec),
        service(name, namespace, spec),
        pdb(name, namespace, spec),
        hpa(name, namespace, spec),
        scaled_object(name, namespace, spec),
        *picker_objects(name, namespace, spec),
        inference_pool(name, namespace, spec),
        http_route(name, namespace, spec),
    ]
    return [manifest for manifest in built if manifest is not None]
