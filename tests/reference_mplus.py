"""Independent float32 re-derivation of M+ (FORWARD with per-layer retrieval, UPDATE with the buffer, MERGE).

Written only from `shared/docs/SEMANTICS-MPLUS.md`, on the building blocks of `tests/reference_memoryllm.py` (plain
torch, no transformers, nothing from the package under test). One batch element. The state is a plain dict:
`stm [L, M, d]`, `stm_ages [L, M]`, lists `ltm`, `keys`, `ages`, `rf` (per layer), `buf_rows`, `buf_keys`,
`buf_ages` (lists per layer), `step`.
"""

from __future__ import annotations

import math

import torch

from tests.reference_memoryllm import _c, layer, lm_logits, reading_adapter, rms_norm


def llama3_inv_freq(cfg, hd: int) -> torch.Tensor:
    """RoPE inverse frequencies `[hd/2]` of `rope_type: llama3` (or plain, without scaling)."""
    scaling = _c(cfg, "rope_scaling")
    inv = 1.0 / (float(_c(cfg, "rope_theta")) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    if not scaling or scaling.get("rope_type") != "llama3":
        return inv
    f, a, b = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    big_c = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv
    t = (big_c / wavelength - a) / (b - a)
    smoothed = (1 - t) * inv / f + t * inv
    return torch.where(wavelength < big_c / b, inv, torch.where(wavelength > big_c / a, inv / f, smoothed))


def projector(sd, name: str, x: torch.Tensor) -> torch.Tensor:
    """`W2 silu(W1 x)` (two layers) or `W x` (one layer)."""
    if f"{name}.weight" in sd:
        return x @ sd[f"{name}.weight"].T
    return torch.nn.functional.silu(x @ sd[f"{name}.0.weight"].T) @ sd[f"{name}.2.weight"].T


def retrieve(sd, cfg, li: int, h: torch.Tensor, state: dict) -> list[int]:
    """RETRIEVE_l: candidate indices into `[LTM ; buffer]`, oldest first (ties: stable ascending, reversed)."""
    k = _c(cfg, "num_ltm_blocks") * _c(cfg, "num_tokens")
    n = len(state["ltm"][li])
    if n < k:
        chosen = [j % n for j in range(n * math.ceil(k / n))][-k:]
    else:
        keys = torch.cat([state["keys"][li], state["buf_keys"][li]])
        hn = rms_norm(h, sd[f"model.layers.{li}.input_layernorm.weight"], _c(cfg, "rms_norm_eps"))
        q = projector(sd, f"model.layers.{li}.self_attn.query_proj", hn)  # [T, s]
        scores = torch.sigmoid(q @ keys.T).mean(0)
        chosen = sorted(scores.topk(k).indices.tolist())
    ages = torch.cat([state["ages"][li], state["buf_ages"][li]])
    order = sorted(range(len(chosen)), key=lambda i: float(ages[chosen[i]]))  # Python's sort is stable
    return [chosen[i] for i in reversed(order)]


@torch.no_grad()
def ref_forward(sd, cfg, state: dict, ids) -> torch.Tensor:
    """FORWARD: logits `[T, V]` reading `[bos, retrieved LTM rows, STM, text]` at contiguous positions."""
    h = sd["model.embed_tokens.weight"][torch.as_tensor(ids).reshape(-1)].float()
    for li in range(_c(cfg, "num_hidden_layers")):
        rows = torch.cat([state["ltm"][li], state["buf_rows"][li]])[retrieve(sd, cfg, li, h, state)]
        bos = [sd["bos_embedding"][li]] if _c(cfg, "add_bos_embedding") else []
        X = torch.cat(bos + [rows, state["stm"][li], h])
        h, _, _ = layer(sd, cfg, li, X, X.shape[0] - h.shape[0], torch.arange(X.shape[0]), reading_adapter(cfg))
    return lm_logits(sd, cfg, h)


@torch.no_grad()
def ref_update(sd, cfg, state: dict, delta: torch.Tensor, generator: torch.Generator) -> dict:
    """UPDATE with delta `[L, N, d]`: drop N rows per layer into the buffer, age, append; MERGE every F updates."""
    L, M, n = state["stm"].shape[0], state["stm"].shape[1], delta.shape[1]
    new = {key: list(value) if isinstance(value, list) else value for key, value in state.items()}
    new["ages"] = [a + n for a in state["ages"]]
    stm, stm_ages = [], []
    for li in range(L):
        perm = torch.randperm(M, generator=generator)
        kept, gone = perm[: M - n].sort().values, perm[M - n :].sort().values
        stm.append(torch.cat([state["stm"][li][kept], delta[li]]))
        stm_ages.append(torch.cat([state["stm_ages"][li][kept], torch.arange(n - 1, -1, -1, dtype=torch.float64)]))
        row = state["stm"][li][gone]
        hn = rms_norm(row, sd[f"model.layers.{li}.input_layernorm.weight"], _c(cfg, "rms_norm_eps"))
        key = projector(sd, f"model.layers.{li}.self_attn.key_proj", hn)
        new["buf_rows"][li] = torch.cat([state["buf_rows"][li], row])
        new["buf_keys"][li] = torch.cat([state["buf_keys"][li], key])
        new["buf_ages"][li] = torch.cat([state["buf_ages"][li] + n, state["stm_ages"][li][gone]])
    new["stm"], new["stm_ages"], new["step"] = torch.stack(stm), torch.stack(stm_ages), state["step"] + n
    if new["step"] >= _c(cfg, "update_ltm_frequency") * _c(cfg, "num_tokens"):
        new = ref_merge(cfg, new)
    return new


def ref_merge(cfg, state: dict) -> dict:
    k = _c(cfg, "num_ltm_blocks") * _c(cfg, "num_tokens")
    decay, rho = _c(cfg, "decay_frequency"), _c(cfg, "initial_rf_when_moving_stm_to_ltm")
    new = dict(state, step=0)
    for name in ("ltm", "keys", "ages", "rf", "buf_rows", "buf_keys", "buf_ages"):
        new[name] = list(state[name])
    for li in range(len(state["ltm"])):
        added = len(state["buf_rows"][li])
        rows = torch.cat([state["ltm"][li], state["buf_rows"][li]])
        keys = torch.cat([state["keys"][li], state["buf_keys"][li]])
        ages = torch.cat([state["ages"][li], state["buf_ages"][li]])
        rf = torch.cat([state["rf"][li], torch.full((added,), float(rho), dtype=torch.float64)]) - decay
        alive = rf > 0.01
        if int(alive.sum()) > k:
            rows, keys, ages, rf = rows[alive], keys[alive], ages[alive], rf[alive]
        else:
            rf = rf + decay
        new["ltm"][li], new["keys"][li], new["ages"][li], new["rf"][li] = rows, keys, ages, rf
        new["buf_rows"][li], new["buf_keys"][li] = rows[:0], keys[:0]
        new["buf_ages"][li] = ages[:0]
    return new
