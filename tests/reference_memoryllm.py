"""Independent float32 re-derivation of MemoryLLM-8B (INJECT, UPDATE, FORWARD, DECODE).

Written only from `shared/docs/SEMANTICS.md`: plain torch, no transformers, no peft, nothing from the package under
test. One batch element, eager attention with explicit boolean masks. Notation as in SEMANTICS.md: `N = num_tokens`,
`K = num_blocks`, `M = N*K`, `b = add_bos_embedding`, `e = new_memory_positional_emb`.

`sd` is a state dict in the released layout, `cfg` a plain dict (or anything with `cfg[key]`) of config values.
"""

from __future__ import annotations

import math

import torch


def _c(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


# ---------------------------------------------------------------- building blocks


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # x [S, d], w [d]
    x = x.float()
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def linear(sd, cfg, name: str, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """`y = x Wᵀ + (alpha/r) (x Aᵀ) Bᵀ` for LoRA targets (active adapter only); plain `x Wᵀ` otherwise."""
    lora = _c(cfg, "lora_config")
    short = name.rsplit(".", 1)[-1]
    if lora is None or short not in lora["target_modules"] or adapter is None:
        w = sd[f"{name}.base_layer.weight"] if f"{name}.base_layer.weight" in sd else sd[f"{name}.weight"]
        return x @ w.T
    y = x @ sd[f"{name}.base_layer.weight"].T  # [S, out]
    a, b = sd[f"{name}.lora_A.{adapter}.weight"], sd[f"{name}.lora_B.{adapter}.weight"]  # [r, in], [out, r]
    return y + (lora["lora_alpha"] / lora["r"]) * ((x @ a.T) @ b.T)


def rope(x: torch.Tensor, pos: torch.Tensor, cfg) -> torch.Tensor:
    # x [H, S, hd], pos [S] -> rotated [H, S, hd] (rotate-half convention)
    hd = x.shape[-1]
    scaling = _c(cfg, "rope_scaling")
    f = float(scaling["factor"]) if scaling and scaling.get("type", scaling.get("rope_type")) == "linear" else 1.0
    inv_freq = 1.0 / (float(_c(cfg, "rope_theta")) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))  # [hd/2]
    angle = (pos.double()[:, None] / f) * inv_freq[None, :]  # [S, hd/2]
    emb = torch.cat([angle, angle], dim=-1)  # [S, hd]
    cos, sin = emb.cos().float(), emb.sin().float()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def layer(sd, cfg, li: int, X: torch.Tensor, P: int, pos: torch.Tensor, adapter: str | None):
    """Prefixed decoder layer `Layer_l(X, P, pos, α)` without cache.

    X [S, d]; the first P rows are prefix (keys/values only). Returns (out [S-P, d], keys [Hkv, S, hd], values).
    """
    S, d = X.shape
    H, Hkv = _c(cfg, "num_attention_heads"), _c(cfg, "num_key_value_heads")
    hd, eps, pre = d // H, _c(cfg, "rms_norm_eps"), f"model.layers.{li}"
    hn = rms_norm(X, sd[f"{pre}.input_layernorm.weight"], eps)  # [S, d] (prefix rows normalised too)
    q = linear(sd, cfg, f"{pre}.self_attn.q_proj", hn[P:], adapter).view(S - P, H, hd).transpose(0, 1)  # [H,S-P,hd]
    k = linear(sd, cfg, f"{pre}.self_attn.k_proj", hn, adapter).view(S, Hkv, hd).transpose(0, 1)  # [Hkv, S, hd]
    v = linear(sd, cfg, f"{pre}.self_attn.v_proj", hn, adapter).view(S, Hkv, hd).transpose(0, 1)  # [Hkv, S, hd]
    q, k = rope(q, pos[P:], cfg), rope(k, pos, cfg)
    rep = H // Hkv
    kk, vv = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)  # [H, S, hd]
    scores = (q @ kk.transpose(1, 2)) / math.sqrt(hd)  # [H, S-P, S]
    mask = torch.arange(S)[None, :] <= (P + torch.arange(S - P))[:, None]  # [S-P, S]: key j visible iff j <= P+r
    scores = scores.masked_fill(~mask, float("-inf"))
    attn = torch.softmax(scores.float(), dim=-1) @ vv  # [H, S-P, hd]
    attn = attn.transpose(0, 1).reshape(S - P, H * hd)  # [S-P, d]
    R = X[P:] + linear(sd, cfg, f"{pre}.self_attn.o_proj", attn, adapter)  # [S-P, d]
    hn2 = rms_norm(R, sd[f"{pre}.post_attention_layernorm.weight"], eps)
    gate = linear(sd, cfg, f"{pre}.mlp.gate_proj", hn2, adapter)
    up = linear(sd, cfg, f"{pre}.mlp.up_proj", hn2, adapter)
    out = R + linear(sd, cfg, f"{pre}.mlp.down_proj", torch.nn.functional.silu(gate) * up, adapter)
    return out, k, v


def lm_logits(sd, cfg, h: torch.Tensor) -> torch.Tensor:
    # h [T, d] -> [T, V]
    return (rms_norm(h, sd["model.norm.weight"], _c(cfg, "rms_norm_eps")) @ sd["lm_head.weight"].T).float()


def reading_adapter(cfg) -> str | None:
    if _c(cfg, "lora_config") is None:
        return None
    return "decoder_adapter" if _c(cfg, "add_decoder_lora") else "default"


def injection_adapter(cfg) -> str | None:
    return None if _c(cfg, "lora_config") is None else "default"


# ---------------------------------------------------------------- procedures


@torch.no_grad()
def ref_forward(sd, cfg, memory: torch.Tensor, initialized: bool, ids):
    """FORWARD: memory [L, M, d], ids [T] -> (logits [T, V], keys [L] of [Hkv, S, hd] post-RoPE, values [L])."""
    ids = torch.as_tensor(ids).reshape(-1)
    h = sd["model.embed_tokens.weight"][ids].float()  # [T, d]
    adapter, use_bos = reading_adapter(cfg), bool(_c(cfg, "add_bos_embedding"))
    keys, values = [], []
    for li in range(_c(cfg, "num_hidden_layers")):
        if initialized:
            prefix = [sd["bos_embedding"][li]] if use_bos else []  # [1, d]
            X = torch.cat(prefix + [memory[li].float(), h], dim=0)  # [b+M+T, d]
            P = X.shape[0] - h.shape[0]
        else:
            X, P = h, 0
        h, k, v = layer(sd, cfg, li, X, P, torch.arange(X.shape[0]), adapter)
        keys.append(k)
        values.append(v)
    return lm_logits(sd, cfg, h), keys, values


@torch.no_grad()
def ref_inject_delta(sd, cfg, memory: torch.Tensor, initialized: bool, ids):
    """INJECT: ids [T] -> (delta [L, n, d], injection logits [T, V]); n = N if initialized else min(N, T)."""
    ids = torch.as_tensor(ids).reshape(-1)
    h = sd["model.embed_tokens.weight"][ids].float()  # [T, d]
    T, L, N = h.shape[0], _c(cfg, "num_hidden_layers"), _c(cfg, "num_tokens")
    e = sd["new_memory_positional_emb"].reshape(-1).float()  # [d]
    adapter, use_bos = injection_adapter(cfg), bool(_c(cfg, "add_bos_embedding"))
    deltas = []
    for li in range(L):
        if initialized:
            prefix = [sd["bos_embedding"][li]] if use_bos else []  # [1, d]
            X = torch.cat(prefix + [memory[li, -N:].float(), h], dim=0)  # [b+N+T, d]: last N memory rows only
            S = X.shape[0]
            P = min(S - T, S - N)  # b+N if T >= N, else b+T (last N-T memory rows become queries)
        else:
            X, S, P = h.clone(), T, 0
        X[S - min(N, S) :] += e  # +e on the last N rows of every layer's input
        out, _, _ = layer(sd, cfg, li, X, P, torch.arange(S), adapter)  # [S-P, d]
        deltas.append(out[-N:].clone())  # [min(N, S-P), d]
        h = out[-T:]  # context rows continue
    if not initialized:  # aliasing: layer l+1 adds e in place into out_l, which delta_l views
        for li in range(L - 1):
            deltas[li] = deltas[li] + e
    return torch.stack(deltas), lm_logits(sd, cfg, h)


def ref_update(cfg, memory: torch.Tensor, initialized: bool, delta: torch.Tensor, kept_indices=None):
    """UPDATE: memory [L, M, d], delta [L, T', d] (batch element 0) -> new memory [L, M, d].

    kept_indices: [L, keep] (per-layer drop) or [keep] (shared); ignored when not initialized (tiling).
    """
    L, M = memory.shape[0], _c(cfg, "num_tokens") * _c(cfg, "num_blocks")
    Tp = delta.shape[1]
    if not initialized:
        if Tp >= M:
            return delta[:, -M:].clone()
        parts = [delta] * (M // Tp) + ([delta[:, Tp - M % Tp :]] if M % Tp else [])
        return torch.cat(parts, dim=1)  # [L, M, d]
    idx = torch.as_tensor(kept_indices)
    idx = idx.expand(L, -1) if idx.dim() == 1 else idx  # [L, keep]
    assert idx.shape[1] == M - Tp, (idx.shape, M, Tp)
    kept = torch.stack([memory[li, idx[li]] for li in range(L)])  # [L, keep, d]
    return torch.cat([kept, delta.to(memory.dtype)], dim=1)  # [L, M, d]


def ref_drop_count(cfg, new_rows: int) -> int:
    M, N, K = _c(cfg, "num_tokens") * _c(cfg, "num_blocks"), _c(cfg, "num_tokens"), _c(cfg, "num_blocks")
    return int(M * (1 / K)) if new_rows == N else new_rows


@torch.no_grad()
def ref_generate_greedy(sd, cfg, memory: torch.Tensor, initialized: bool, prompt_ids, steps: int) -> list[int]:
    """Greedy DECODE by recomputing the full FORWARD each step; returns only the `steps` new ids."""
    seq = [int(i) for i in torch.as_tensor(prompt_ids).reshape(-1)]
    new = []
    for _ in range(steps):
        logits, _, _ = ref_forward(sd, cfg, memory, initialized, torch.tensor(seq))
        nxt = int(logits[-1].argmax())
        seq.append(nxt)
        new.append(nxt)
    return new
