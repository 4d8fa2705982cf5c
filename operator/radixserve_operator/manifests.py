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


def server_args(name: str, spec: Spec) -> list[str]:
    """`radixserve serve` flags for the spec (DESIGN.md's contract)."""
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
    }
    for field, flag in optional.items():
        if field in engine:
            args += [flag, str(engine[field])]
    if engine["disableRadixCache"]:
        args.append("--disable-radix-cache")
    args += ["--shutdown-timeout", str(engine["shutdownTimeoutSeconds"])]
    args += ["--log-level", engine["logLevel"]]
    return args + list(engine.get("extraArgs", []))


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


def deployment(name: str, namespace: str, spec: Spec) -> Manifest:
    image_spec = spec["image"]
    image = f"{image_spec['repository']}:{image_spec['tag']}"
    volumes, mounts = _volumes(name, spec)
    container = {
        "name": "server",
        "image": image,
        "imagePullPolicy": image_spec["pullPolicy"],
        "command": ["radixserve", "serve"],
        "args": server_args(name, spec),
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
        "containers": [container],
        "volumes": volumes,
    }
    if not pod_spec["initContainers"]:
        del pod_spec["initContainers"]
    for field in ("nodeSelector", "tolerations", "affinity"):
        if spec.get(field):
            pod_spec[field] = spec[field]
    if image_spec.get("pullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": s} for s in image_spec["pullSecrets"]]
    template_meta: dict[str, Any] = {"labels": labels(name)}
    if spec.get("podAnnotations"):
        template_meta["annotations"] = dict(spec["podAnnotations"])
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
            "template": {"metadata": template_meta, "spec": pod_spec},
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
            "selector": selector(name),
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
    if scaling is None:
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


def inference_pool(name: str, namespace: str, spec: Spec) -> Manifest | None:
    pool = spec.get("inferencePool")
    if pool is None:
        return None
    picker = pool["endpointPickerRef"]
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "selector": {"matchLabels": selector(name)},
            "targetPorts": [{"number": SERVER_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": picker["name"],
                "port": {"number": picker["port"]},
                "failureMode": picker["failureMode"],
            },
        },
    }


def children(name: str, namespace: str, spec: Spec) -> list[Manifest]:
    """Everything one ModelDeployment owns, in the order to apply it."""
    built = [
        model_cache_pvc(name, namespace, spec),
        deployment(name, namespace, spec),
        service(name, namespace, spec),
        pdb(name, namespace, spec),
        hpa(name, namespace, spec),
        inference_pool(name, namespace, spec),
    ]
    return [manifest for manifest in built if manifest is not None]
