"""The `auto` attention backend treats any failure to load FlashInfer as "not available".

FlashInfer raises RuntimeError (not ImportError) on import when flashinfer-python and
flashinfer-cubin versions differ; the server must then fall back to torch and say why,
not crash at start. No GPU needed: the probe runs before any CUDA work.
"""

from __future__ import annotations

import builtins
import logging

import pytest
import torch
from radixserve.layers.attention import create_attention_backend
from radixserve.layers.attention.torch_backend import TorchAttentionBackend


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("flashinfer-cubin version (0.4.1) does not match flashinfer (0.7.4)"),
        ImportError("No module named 'flashinfer'"),
        OSError("libcuda.so.1: cannot open shared object file"),
    ],
)
def test_a_flashinfer_that_fails_to_load_falls_back_to_torch_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    real_import = builtins.__import__

    def failing_import(name: str, *args, **kwargs):
        if name == "flashinfer":
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "flashinfer", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    with caplog.at_level(logging.WARNING, logger="radixserve.layers.attention"):
        backend = create_attention_backend("auto", "cuda", num_heads=4, dtype=torch.bfloat16)
    assert isinstance(backend, TorchAttentionBackend)
    assert f"{type(error).__name__}: {error}" in caplog.text
