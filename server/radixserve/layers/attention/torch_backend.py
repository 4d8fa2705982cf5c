"""Attention with torch's scaled_dot_product_attention, on any device.

Each step gathers the requests' slots into a padded table once; every layer then does one
gather of K/V and one SDPA call for the prefill group and one for the decode group, so the
per-layer cost does not grow with the number of requests in Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixserve.layers.attention.base import AttentionBackend, ForwardBatch


def _slot_table(
    slots: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-request slot lists into [B, L] (padding points at scratch slot 0)."""
    lens = torch.tensor([s.numel() for s in slots], dtype=torch.int64)
    table = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True, padding_value=0)
    return table.to(device, non_blocking=True), lens


def _sdpa(q, k, v, **kw) -> torch.Tensor:
    """SDPA in float32 on the CPU. In bfloat16 the CPU kernels for a whole causal prompt
    and for one query over a cached prefix round differently, enough to flip greedy
    tokens of a small model between a cache hit and a miss; float32 makes them agree."""
    if q.device.type == "cpu" and q.dtype != torch.float32:
        return F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), enable_gqa=True, **kw
        ).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)


class TorchAttentionBackend(AttentionBackend):
    def init_forward(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        md: dict = {}
        np_ = batch.num_prefill_reqs
        if np_:
            pre = batch.prefix_lens[:np_]
            ext = batch.extend_lens[:np_]
            if np_ == 1 and pre[0] == 0:
                md["prefill_plain"] = True  # a fresh prompt attends only to itself
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
                md["prefill_mask"] = mask[:, None].to(device)
                md["prefill_q_index"] = q_index.to(device)
                md["prefill_q_valid"] = q_valid.reshape(-1).to(device)
        nd = batch.batch_size - np_
        if nd:
            table, kv_lens = _slot_table(batch.req_slots[np_:], device)
            mask = torch.arange(table.shape[1])[None, :] < kv_lens[:, None]
            md["decode_table"] = table
            md["decode_mask"] = mask[:, None, None, :].to(device)
        batch.metadata["torch"] = md

    def forward(self, q, k, v, layer_id, batch, scale):
        pool = batch.kv_pool
        pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        md = batch.metadata["torch"]
        kb, vb = pool.k_buffer[layer_id], pool.v_buffer[layer_id]
        npt = batch.num_prefill_tokens
        outs = []
        if batch.num_prefill_reqs:
            if md.get("prefill_plain"):
                o = _sdpa(
                    q[:npt].transpose(0, 1)[None],
                    k[:npt].transpose(0, 1)[None],
                    v[:npt].transpose(0, 1)[None],
                    is_causal=True,
                    scale=scale,
                )
                outs.append(o[0].transpose(0, 1))
            else:
                table = md["prefill_table"]
                qp = q[md["prefill_q_index"]].transpose(1, 2)  # [B, H, Q, D]
                kp = kb[table].transpose(1, 2)
                vp = vb[table].transpose(1, 2)
                o = _sdpa(qp, kp, vp, attn_mask=md["prefill_mask"], scale=scale)
                o = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
                outs.append(o[md["prefill_q_valid"]])
        if batch.batch_size > batch.num_prefill_reqs:
            table = md["decode_table"]
            qd = q[npt:, :, None, :]  # [B, H, 1, D]
            kd = kb[table].transpose(1, 2)
            vd = vb[table].transpose(1, 2)
            o = _sdpa(qd, kd, vd, attn_mask=md["decode_mask"], scale=scale)
            outs.append(o[:, :, 0, :])
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
