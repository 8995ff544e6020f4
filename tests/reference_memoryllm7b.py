"""Independent float32 re-derivation of MemoryLLM-7B (INJECT, UPDATE, FORWARD, DECODE).

Written only from `shared/docs/SEMANTICS-7B.md`: plain torch, no transformers, nothing from the package under test.
The building blocks the 7B shares with the 8B (RMSNorm, the projections, the LM head, the drop count) are imported
from `tests/reference_memoryllm.py`; what differs is written here:

* RoPE: base 10000 whatever `rope_theta` says, and `angle = (pos * s) * inv_freq` with
  `s = 1/f` for linear `rope_scaling` (which wins), else `s = Lmax / max(Lmax, (K+1)*N)` when
  `interpolate_position_ids` is true, else `s = 1`;
* no adapters (plain `<module>.weight`);
* the first injection into an empty memory adds no `e` and aliases nothing;
* the drop is one index set shared by every layer, and at init = 0 a delta of `T' >= M` rows becomes the memory.

One batch element, eager attention with explicit boolean masks; GQA by repeating the KV heads (the original only runs
MHA; the rule for the other heads is the usual one). `sd` is a state dict in the released layout, `cfg` a dict of the
released config keys.
"""

from __future__ import annotations

import math

import torch

from tests.reference_memoryllm import _c, linear, lm_logits, ref_drop_count, rms_norm


ROPE_BASE = 10000.0


def rope_scale(cfg) -> float:
    """The factor `s` every position is multiplied by before the angle (SEMANTICS-7B.md, RoPE)."""
    scaling = _c(cfg, "rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind == "linear":
            return 1.0 / float(scaling["factor"])
        raise NotImplementedError(f"rope_scaling {kind!r} is not re-derived here")
    if _c(cfg, "interpolate_position_ids", False):
        lmax = _c(cfg, "max_position_embeddings")
        span = (_c(cfg, "num_blocks") + 1) * _c(cfg, "num_tokens")
        return lmax / max(lmax, span)
    return 1.0


def rope(x: torch.Tensor, pos: torch.Tensor, cfg) -> torch.Tensor:
    # x [H, S, hd], pos [S] -> rotated [H, S, hd] (rotate-half); base 10000, positions scaled by s
    hd = x.shape[-1]
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))  # [hd/2]
    angle = (pos.double()[:, None] * rope_scale(cfg)) * inv_freq[None, :]  # [S, hd/2]
    emb = torch.cat([angle, angle], dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def layer(sd, cfg, li: int, X: torch.Tensor, P: int, pos: torch.Tensor):
    """Prefixed decoder layer: X [S, d], the first P rows are prefix (keys/values only), no adapters.
    Returns (out [S-P, d], post-RoPE keys [Hkv, S, hd], values [Hkv, S, hd])."""
    S, d = X.shape
    H, Hkv = _c(cfg, "num_attention_heads"), _c(cfg, "num_key_value_heads", _c(cfg, "num_attention_heads"))
    hd, eps, pre = d // H, _c(cfg, "rms_norm_eps"), f"model.layers.{li}"
    hn = rms_norm(X, sd[f"{pre}.input_layernorm.weight"], eps)  # all S rows through the input norm
    q = linear(sd, {}, f"{pre}.self_attn.q_proj", hn[P:], None).view(S - P, H, hd).transpose(0, 1)
    k = linear(sd, {}, f"{pre}.self_attn.k_proj", hn, None).view(S, Hkv, hd).transpose(0, 1)
    v = linear(sd, {}, f"{pre}.self_attn.v_proj", hn, None).view(S, Hkv, hd).transpose(0, 1)
    q, k = rope(q, pos[P:], cfg), rope(k, pos, cfg)
    kk, vv = k.repeat_interleave(H // Hkv, dim=0), v.repeat_interleave(H // Hkv, dim=0)
    scores = (q @ kk.transpose(1, 2)) / math.sqrt(hd)  # [H, S-P, S]
    visible = torch.arange(S)[None, :] <= (P + torch.arange(S - P))[:, None]  # query r sees key j iff j <= P+r
    attn = torch.softmax(scores.masked_fill(~visible, float("-inf")).float(), dim=-1) @ vv
    attn = attn.transpose(0, 1).reshape(S - P, H * hd)
    R = X[P:] + linear(sd, {}, f"{pre}.self_attn.o_proj", attn, None)  # only query rows get the residual
    hn2 = rms_norm(R, sd[f"{pre}.post_attention_layernorm.weight"], eps)
    gate = linear(sd, {}, f"{pre}.mlp.gate_proj", hn2, None)
    up = linear(sd, {}, f"{pre}.mlp.up_proj", hn2, None)
    return R + linear(sd, {}, f"{pre}.mlp.down_proj", torch.nn.functional.silu(gate) * up, None), k, v


def _embed(sd, ids) -> torch.Tensor:
    return sd["model.embed_tokens.weight"][torch.as_tensor(ids).reshape(-1)].float()  # [T, d]


def _bos(sd, cfg, li: int) -> list[torch.Tensor]:
    return [sd["bos_embedding"][li].float()] if _c(cfg, "add_bos_embedding") else []


@torch.no_grad()
def ref_forward(sd, cfg, memory: torch.Tensor, initialized: bool, ids):
    """FORWARD: `[bos, memory (all M), text]` at positions 0..S-1 (init = 1), or the plain model over the text
    (init = 0). Returns (logits [T, V], keys per layer [Hkv, S, hd] post-RoPE, values per layer)."""
    h = _embed(sd, ids)
    keys, values = [], []
    for li in range(_c(cfg, "num_hidden_layers")):
        X = torch.cat(_bos(sd, cfg, li) + [memory[li].float(), h]) if initialized else h
        h, k, v = layer(sd, cfg, li, X, X.shape[0] - h.shape[0], torch.arange(X.shape[0]))
        keys.append(k)
        values.append(v)
    return lm_logits(sd, cfg, h), keys, values


@torch.no_grad()
def ref_inject_delta(sd, cfg, memory: torch.Tensor, initialized: bool, ids):
    """INJECT: (delta [L, n, d], injection logits [T, V]); n = N at init = 1, min(N, T) at init = 0.

    init = 1: `X = [bos; last N memory rows; text]`, `P = b + min(T, N)`, `+e` on the last N rows, delta = the
    last N output rows. init = 0: `X = text`, `P = 0`, no `e`, delta = the last min(N, T) output rows."""
    h = _embed(sd, ids)
    T, N = h.shape[0], _c(cfg, "num_tokens")
    e = sd["new_memory_positional_emb"].reshape(-1).float()
    deltas = []
    for li in range(_c(cfg, "num_hidden_layers")):
        if initialized:
            bos = _bos(sd, cfg, li)
            X = torch.cat(bos + [memory[li, -N:].float(), h])
            P = len(bos) + min(T, N)
            X = torch.cat([X[:-N], X[-N:] + e])
        else:
            X, P = h, 0
        out, _, _ = layer(sd, cfg, li, X, P, torch.arange(X.shape[0]))
        deltas.append(out[-min(N, out.shape[0]) :])
        h = out[-T:]
    return torch.stack(deltas), lm_logits(sd, cfg, h)


def ref_update(cfg, memory: torch.Tensor, initialized: bool, delta: torch.Tensor, kept_indices=None) -> torch.Tensor:
    """UPDATE: memory [L, M, d], delta [L, T', d]. init = 0: tile when T' < M, else the whole delta. init = 1:
    `[memory[:, idx]; delta]` with ONE ascending index set `kept_indices` [M - drop] for every layer."""
    M, Tp = _c(cfg, "num_tokens") * _c(cfg, "num_blocks"), delta.shape[1]
    if not initialized:
        if Tp >= M:
            return delta.clone()
        parts = [delta] * (M // Tp) + ([delta[:, Tp - M % Tp :]] if M % Tp else [])
        return torch.cat(parts, dim=1)
    idx = torch.as_tensor(kept_indices)
    assert idx.dim() == 1 and idx.shape[0] == M - ref_drop_count(cfg, Tp), (idx.shape, M, Tp)
    return torch.cat([memory[:, idx], delta.to(memory.dtype)], dim=1)


@torch.no_grad()
def ref_generate_greedy(sd, cfg, memory: torch.Tensor, initialized: bool, prompt_ids, steps: int) -> list[int]:
    """Greedy decoding with every key visible, as a loop of full FORWARDs; returns the `steps` new ids."""
    seq = [int(i) for i in torch.as_tensor(prompt_ids).reshape(-1)]
    for _ in range(steps):
        seq.append(int(ref_forward(sd, cfg, memory, initialized, torch.tensor(seq))[0][-1].argmax()))
    return seq[-steps:]
