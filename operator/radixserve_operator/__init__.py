"""The radixserve operator: reconciles ModelDeployments into serving workloads."""

GROUP = "radixserve.dev"
VERSION = "v1alpha1"
PLURAL = "modeldeployments"
KIND = "ModelDeployment"
