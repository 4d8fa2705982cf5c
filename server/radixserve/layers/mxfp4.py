"""MXFP4 weights (OCP microscaling FP4), the format gpt-oss checkpoints store experts in.

A weight W [..., rows, cols] (rows the output features, cols the input, cols a multiple of
32) is stored as two tensors:
- `*_blocks` uint8 [..., rows, cols / 32, 16]: 32 e2m1 values per block, two per byte,
  the LOW nibble holding the earlier element (even column), the high nibble the next;
  a nibble's bit 3 is the sign and bits 0-2 index 0, 0.5, 1, 1.5, 2, 3, 4, 6;
- `*_scales` uint8 [..., rows, cols / 32]: one e8m0 exponent per block; the block's values
  are multiplied by 2 ** (scale - 127).
Checked against transformers 5.25 (`integrations/mxfp4.py`, `_convert_moe_packed_tensors`:
`blk & 0x0F` fills the even columns, `blk >> 4` the odd ones, `scales - 127` goes to
`ldexp`, the same 16-entry table) and end to end by tests/server/test_model_families.py.

The engine dequantizes at load (`dequantize_mxfp4`) into the model's dtype and runs its
usual expert matmuls; a packed MXFP4 kernel would keep what `Mxfp4Pairs` hands over
instead of dequantizing it.
"""

from __future__ import annotations

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = 32  # values per scale


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
    """W [..., rows, cols] in `dtype` from its blocks and scales (exact: every MXFP4 value
    is representable in float32 and bfloat16). Computed in float32; callers bound memory
    by passing one expert at a time."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}: "
            f"expected blocks [..., groups, {BLOCK // 2}] and scales [..., groups]"
        )
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), device=blocks.device)
    low, high = table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., groups, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).to(dtype)


class Mxfp4Pairs:
    """Pairs each checkpoint's `X_blocks` with its `X_scales`: files may hold either first,
    and one is useless without the other."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(blocks, scales) once both halves of `name`'s weight are in, else None."""
        base, kind = name.rsplit("_", 1)
        if kind not in ("blocks", "scales"):
            raise ValueError(f"{name}: not an MXFP4 tensor (expected *_blocks or *_scales)")
        other = self._waiting.pop(base, None)
        if other is None:
            self._waiting[base] = (kind, tensor)
            return None
        return (tensor, other[1]) if kind == "blocks" else (other[1], tensor)
