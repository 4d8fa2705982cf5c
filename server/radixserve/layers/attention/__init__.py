"""Attention backends behind one small interface (see base.py)."""

import logging

import torch

from radixserve.layers.attention.base import AttentionBackend, ForwardBatch, KVPool

logger = logging.getLogger(__name__)

__all__ = ["AttentionBackend", "ForwardBatch", "KVPool", "create_attention_backend"]


# what FlashInfer's attention kernels take (it has no float32 kernels)
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)


def create_attention_backend(
    name: str, device: str, num_heads: int, dtype: torch.dtype
) -> AttentionBackend:
    """Pick a backend by name; `auto` means FlashInfer on CUDA when it is installed and the
    model runs in float16 or bfloat16."""
    if name == "auto":
        name = "torch"
        if device.startswith("cuda") and dtype in FLASHINFER_DTYPES:
            try:
                import flashinfer  # noqa: F401

                name = "flashinfer"
            except Exception as error:
                # Not only ImportError: FlashInfer raises RuntimeError on import when
                # flashinfer-python and flashinfer-cubin versions differ, and a broken CUDA
                # setup can fail in other ways; any of them means "not available".
                logger.warning(
                    "flashinfer is not available (%s: %s): CUDA attention runs on torch SDPA",
                    type(error).__name__,
                    error,
                )
    if name == "torch":
        from radixserve.layers.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "flashinfer":
        if not device.startswith("cuda"):
            raise ValueError("--attention-backend flashinfer needs a CUDA device")
        if dtype not in FLASHINFER_DTYPES:
            raise ValueError(
                f"--attention-backend flashinfer runs float16 or bfloat16, not {dtype}: "
                "use --attention-backend torch (or auto) for float32"
            )
        from radixserve.layers.attention.flashinfer_backend import FlashInferAttentionBackend

        return FlashInferAttentionBackend(device, num_heads)
    raise ValueError(f"unknown attention backend {name!r}: expected auto, torch or flashinfer")
