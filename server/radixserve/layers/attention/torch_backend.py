"""Attention with torch's scaled_dot_product_attention, on any device.

Each step gathers the requests' slots into a padded table once; every layer then does one
gather of K/V and one SDPA call for the prefill group and two batched matmuls for the decode
group, so the per-layer cost does not grow with the number of requests in Python.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F

from radixserve.layers import cpu_kernels
from radixserve.layers.attention.base import AttentionBackend, ForwardBatch


def _slot_table(
    slots: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-request slot lists into [B, L] (padding points at scratch slot 0)."""
    lens = torch.tensor([s.numel() for s in slots], dtype=torch.int64)
    table = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True, padding_value=0)
    return table.to(device, non_blocking=True), lens


def _causal_mask(
    prefix: int, extend: int, device: torch.device, window: int | None = None
) -> torch.Tensor | None:
    """[extend, prefix + extend] True where query i may see key j (j <= prefix + i, and
    with a window j > prefix + i - window); None for a fresh prompt without a window, where
    SDPA's own causal flag is the same rule."""
    if prefix == 0 and window is None:
        return None
    keys = torch.arange(prefix + extend, device=device)[None, :]
    last = prefix + torch.arange(extend, device=device)[:, None]
    mask = keys <= last
    return mask & (keys > last - window) if window is not None else mask


def _sdpa(q, k, v, **kw) -> torch.Tensor:
    """SDPA in float32 on the CPU. In bfloat16 the CPU kernels for a whole causal prompt
    and for one query over a cached prefix round differently, enough to flip greedy
    tokens of a small model between a cache hit and a miss; float32 makes them agree."""
    if q.device.type == "cpu" and q.dtype != torch.float32:
        return F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), enable_gqa=True, **kw
        ).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)


def _attend(q, k, v, mask, scale, sinks=None) -> torch.Tensor:
    """Attention for [B, H, Q, D] queries over [B, Hkv, L, D] keys: SDPA, or with per-head
    sinks (which SDPA cannot add to its softmax) the same in float32 matmuls.
    `mask` is [B or 1, 1, Q, L] or [Q, L] (True where visible), or None for causal."""
    if sinks is None:
        return _sdpa(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, 1)
    v = v.float().repeat_interleave(group, 1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if mask is None:
        qn, kn = scores.shape[-2:]
        mask = torch.ones(qn, kn, dtype=torch.bool, device=q.device).tril(kn - qn)
    scores = scores.masked_fill(~mask, float("-inf"))
    # the sink's logit joins the softmax; its probability is dropped
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
    return torch.matmul(probs, v).to(q.dtype)


# A prefill group padded to its longest prompt and longest context costs B x Q x L scores
# (and SDPA's masked path materialises them); when that is this many times what the
# requests need, each request runs on its own instead: ShareGPT-like mixed lengths in one
# chunk otherwise compute mostly padding.
_PREFILL_PAD_WASTE = 2.0


# below this many K elements per layer, bfloat16 batched matmuls cost more in fixed overhead
# than converting K and V to float32 first (measured: [3, 64] x [64, 60] is 14 us in bf16,
# 7 us converted; at 96 x [3, 64] x [64, 300] bf16 is 3x faster)
_FLOAT32_DECODE_ELEMENTS = 1 << 16


def _decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pad: torch.Tensor | None,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per request. q [B, H, D]; k, v [Hkv, B, L, D] (a gather, or a view of the
    pool for one request); pad [B, L] True where padded, or None where nothing is.

    Two batched matmuls over (KV head, request) with the query heads of a group as rows:
    the head-major gather is already in their layout, so nothing is copied again, unlike
    SDPA's query-blocked kernel, which pays for the padding and a float32 copy of K and V.
    Scores and softmax are float32; the score matmul itself runs in the model's dtype.
    """
    hk, b, length, d = k.shape
    g = q.shape[1] // hk
    dtype = q.dtype
    if dtype != torch.float32 and k.numel() <= _FLOAT32_DECODE_ELEMENTS:
        q, k, v = q.float(), k.float(), v.float()
    elif dtype != torch.float32 and not k.is_contiguous():
        # a view of the pool: bfloat16 batched matmuls on strided heads are several times
        # slower than a copy first (measured at 1,024 keys: 3.5 ms a step)
        k, v = k.contiguous(), v.contiguous()
    qh = q.view(b, hk, g, d).transpose(0, 1).reshape(hk * b, g, d)
    scores = torch.bmm(qh, k.reshape(hk * b, length, d).transpose(1, 2)).float().mul_(scale)
    scores = scores.view(hk, b, g, length)
    if pad is not None:
        scores = scores.masked_fill_(pad[None, :, None, :], float("-inf"))
    if sinks is not None:  # per query head; its probability is dropped after the softmax
        sink = sinks.float().view(hk, 1, g, 1).expand(hk, b, g, 1)
        p = torch.cat([scores, sink], -1).softmax(-1)[..., :-1].to(v.dtype)
        p = p.reshape(hk * b, g, length)
    else:
        p = scores.softmax(-1).to(v.dtype).view(hk * b, g, length)
    o = torch.bmm(p, v.reshape(hk * b, length, d))
    return o.view(hk, b, g, d).transpose(0, 1).reshape(b, hk * g, d).to(dtype)


class TorchAttentionBackend(AttentionBackend):
    kv_head_major = True
    supports_window_and_sinks = True
    # radixserve's CPU kernel for one decoding request (set with the int4 path; its float32
    # sums run in another order than torch's)
    cpu_kernel = False

    def init_forward(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        md: dict = {}
        np_ = batch.num_prefill_reqs
        if np_:
            pre = batch.prefix_lens[:np_]
            ext = batch.extend_lens[:np_]
            md["prefill_lens"] = (pre, ext)
            padded = np_ * max(ext) * max(p + e for p, e in zip(pre, ext, strict=True))
            needed = sum(e * (p + e) for p, e in zip(pre, ext, strict=True))
            # one fresh prompt attends only to itself: the per-request path with no gather
            if (np_ == 1 and pre[0] == 0) or padded > _PREFILL_PAD_WASTE * needed:
                md["prefill_each"] = [
                    (start, e, slots.to(device) if p else None, _causal_mask(p, e, device))
                    for start, p, e, slots in zip(
                        accumulate(ext[:-1], initial=0), pre, ext, batch.req_slots[:np_],
                        strict=True,
                    )
                ]  # fmt: skip
            else:
                table, kv_lens = _slot_table(batch.req_slots[:np_], device)
                qmax, lmax = max(ext), table.shape[1]
                qpos = torch.arange(qmax)
                kpos = torch.arange(lmax)
                pre_t = torch.tensor(pre)
                ext_t = torch.tensor(ext)
                mask = (kpos[None, None, :] <= (pre_t[:, None, None] + qpos[None, :, None])) & (
                    kpos[None, None, :] < kv_lens[:, None, None]
                )
                starts = torch.cumsum(ext_t, 0) - ext_t
                q_valid = qpos[None, :] < ext_t[:, None]
                q_index = torch.where(q_valid, starts[:, None] + qpos[None, :], 0)
                md["prefill_table"] = table
                md["prefill_positions"] = (kpos, pre_t, qpos)  # for windowed masks
                md["prefill_mask"] = mask[:, None].to(device)
                md["prefill_q_index"] = q_index.to(device)
                md["prefill_q_valid"] = q_valid.reshape(-1).to(device)
        nd = batch.batch_size - np_
        if nd == 1 and device.type == "cpu" and batch.kv_pool.head_major:
            # a single stream whose slots are one run (the allocator hands them out in
            # order): each layer reads its K/V as a view of the pool, without a gather
            slots = batch.req_slots[np_]
            first, n = int(slots[0]), slots.numel()
            if int(slots[-1]) == first + n - 1 and torch.equal(
                slots, torch.arange(first, first + n, dtype=slots.dtype)
            ):
                md["decode_run"] = (first, n)
                md["decode_lens"] = torch.tensor([n])
                md["decode_pad"] = torch.zeros(1, n, dtype=torch.bool)  # for a window only
        if nd and "decode_run" not in md:
            table, kv_lens = _slot_table(batch.req_slots[np_:], device)
            md["decode_table"] = table
            md["decode_lens"] = kv_lens
            md["decode_pad"] = (torch.arange(table.shape[1])[None, :] >= kv_lens[:, None]).to(
                device
            )
        batch.metadata["torch"] = md

    def _kernel_fits(self, q, pool, window, sinks) -> bool:
        """radixserve's CPU decode attention takes this layer: no window or sinks, float32 or
        bfloat16, a head size it vectorises."""
        return (
            self.cpu_kernel
            and window is None
            and sinks is None
            and q.dtype in (torch.float32, torch.bfloat16)
            and pool.dtype in (torch.float32, torch.bfloat16)
            and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256
        )

    @staticmethod
    def _windowed(md: dict, window: int, device: torch.device) -> dict:
        """The step's masks narrowed to a sliding window: built on the first layer that asks
        and shared by the others with the same window. Keys outside the window stay in the
        pool (the radix cache may hand them to a later request); they are only masked."""
        key = ("window", window)
        if key in md:
            return md[key]
        out: dict = {}
        if "prefill_each" in md:
            out["prefill_each"] = [
                (start, e, slots, _causal_mask(p, e, device, window))
                for (start, e, slots, _), p in zip(
                    md["prefill_each"], md["prefill_lens"][0], strict=True
                )
            ]
        if "prefill_mask" in md:
            kpos, pre_t, qpos = md["prefill_positions"]
            inside = kpos[None, None, :] > pre_t[:, None, None] + qpos[None, :, None] - window
            out["prefill_mask"] = md["prefill_mask"] & inside[:, None].to(device)
        if "decode_pad" in md:
            kv_lens = md["decode_lens"]
            width = md["decode_pad"].shape[1]
            outside = torch.arange(width)[None, :] < (kv_lens[:, None] - window)
            out["decode_pad"] = md["decode_pad"] | outside.to(device)
        md[key] = out
        return out

    def forward(self, q, k, v, layer_id, batch, scale, window=None, sinks=None):
        pool = batch.kv_pool
        pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        md = batch.metadata["torch"]
        masks = md if window is None else {**md, **self._windowed(md, window, q.device)}
        npt = batch.num_prefill_tokens
        outs = []
        if batch.num_prefill_reqs:
            if "prefill_each" in masks:
                for start, e, slots, mask in masks["prefill_each"]:
                    if slots is None:  # a fresh prompt: its K/V are this step's own
                        kp = k[start : start + e].transpose(0, 1)[None]
                        vp = v[start : start + e].transpose(0, 1)[None]
                    else:  # [1, Hkv, prefix + extend, D]
                        kp, vp = (t.transpose(0, 1) for t in pool.gather(layer_id, slots[None]))
                    qp = q[start : start + e].transpose(0, 1)[None]
                    o = _attend(qp, kp, vp, mask, scale, sinks)
                    outs.append(o[0].transpose(0, 1))
            else:
                kp, vp = pool.gather(layer_id, md["prefill_table"])  # [Hkv, B, L, D]
                qp = q[md["prefill_q_index"]].transpose(1, 2)  # [B, H, Q, D]
                kp, vp = kp.transpose(0, 1), vp.transpose(0, 1)
                o = _attend(qp, kp, vp, masks["prefill_mask"], scale, sinks)
                o = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
                outs.append(o[md["prefill_q_valid"]])
        if batch.batch_size > batch.num_prefill_reqs:
            pad = masks["decode_pad"]
            if "decode_run" not in md:
                kd, vd = pool.gather(layer_id, md["decode_table"])
                outs.append(_decode_attention(q[npt:], kd, vd, pad, scale, sinks))
            elif self._kernel_fits(q, pool, window, sinks):
                first, n = md["decode_run"]
                k_buf, v_buf = pool.k_buffer[layer_id], pool.v_buffer[layer_id]
                outs.append(
                    cpu_kernels.decode_attention(q[npt], k_buf, v_buf, first, n, scale)[None]
                )
            else:
                first, n = md["decode_run"]
                kd = pool.k_buffer[layer_id][:, first : first + n].unsqueeze(1)
                vd = pool.v_buffer[layer_id][:, first : first + n].unsqueeze(1)
                pad = pad if window is not None else None  # one request: nothing padded
                outs.append(_decode_attention(q[npt:], kd, vd, pad, scale, sinks))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
