"""Attention backends behind one small interface (see base.py)."""

import logging

from radixserve.layers.attention.base import AttentionBackend, ForwardBatch, KVPool

logger = logging.getLogger(__name__)

__all__ = ["AttentionBackend", "ForwardBatch", "KVPool", "create_attention_backend"]


def create_attention_backend(name: str, device: str, num_heads: int) -> AttentionBackend:
    """Pick a backend by name; `auto` means FlashInfer on CUDA when it is installed."""
    if name == "auto":
        name = "torch"
        if device.startswith("cuda"):
            try:
                import flashinfer  # noqa: F401

                name = "flashinfer"
            except ImportError:
                logger.warning("flashinfer is not installed: CUDA attention runs on torch SDPA")
    if name == "torch":
        from radixserve.layers.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "flashinfer":
        if not device.startswith("cuda"):
            raise ValueError("--attention-backend flashinfer needs a CUDA device")
        from radixserve.layers.attention.flashinfer_backend import FlashInferAttentionBackend

        return FlashInferAttentionBackend(device, num_heads)
    raise ValueError(f"unknown attention backend {name!r}: expected auto, torch or flashinfer")
