"""`radixserve-operator`: run the handlers with kopf's own login (service account or kubeconfig)."""

from __future__ import annotations

import argparse
import logging
import os

import kopf

from . import handlers, manifests
from .kube import KubeClient
from .reconcile import Reconciler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="radixserve-operator", description=__doc__)
    parser.add_argument(
        "--namespace",
        action="append",
        default=[n for n in env("RADIXSERVE_OPERATOR_NAMESPACES", "").split(",") if n],
        help="watch this namespace (repeatable; env RADIXSERVE_OPERATOR_NAMESPACES, "
        "comma-separated); none means all namespaces",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(env("RADIXSERVE_OPERATOR_RESYNC_SECONDS", "30")),
        help="how often each ModelDeployment is re-applied and its model probed",
    )
    parser.add_argument(
        "--probe-timeout",
        type=float,
        default=float(env("RADIXSERVE_OPERATOR_PROBE_TIMEOUT", "5")),
        help="seconds for each call to a model's /health and /v1/models",
    )
    parser.add_argument(
        "--no-probe-models",
        action="store_true",
        default=env("RADIXSERVE_OPERATOR_PROBE_MODELS", "true").lower() in ("0", "false", "no"),
        help="trust pod readiness instead of calling each model's Service "
        "(when a NetworkPolicy keeps the operator out)",
    )
    parser.add_argument(
        "--endpoint-picker-image",
        default=env("RADIXSERVE_OPERATOR_ENDPOINT_PICKER_IMAGE", manifests.DEFAULT_PICKER_IMAGE),
        help="image of the endpoint picker run for spec.inferencePool when the spec names none",
    )
    parser.add_argument(
        "--liveness",
        default=env("RADIXSERVE_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="kopf's liveness endpoint",
    )
    parser.add_argument(
        "--log-level",
        default=env("RADIXSERVE_OPERATOR_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    # The smart registry carries kopf's fallback login handlers (in-cluster, kubeconfig).
    registry = kopf.SmartOperatorRegistry()
    reconciler = Reconciler(
        kube=KubeClient.from_kubeconfig(),
        probe_models=not args.no_probe_models,
        probe_timeout=args.probe_timeout,
        picker_image=args.endpoint_picker_image,
    )
    handlers.register(registry, reconciler, resync_seconds=args.resync_seconds)
    kopf.run(
        registry=registry,
        standalone=True,  # one replica with a Recreate strategy: no peering needed
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )


if __name__ == "__main__":
    main()
