"""
Attention over the memory prefix: transformers' sdpa, but with grouped-query attention where a mask allows it.

A query behind the prefix always needs a mask (its keys start P rows before it), and with a mask transformers'
sdpa expands the key/value heads to the query heads (`repeat_kv`), since its CUDA kernels would otherwise fall back
to the math kernel. On the CPU every sdpa kernel runs grouped-query attention with a mask, so there the expansion, a
copy of the whole prefix per layer and call (about 9 MB per layer for the default's 2,049 rows), is skipped; and a
decode step, which reads the prefix once, runs as two matrix products per key/value head. A longer masked query
runs by chunks of queries over the keys they can see, skipping most of the causal triangle that a masked sdpa call
computes in full (a quarter of an injection's attention).

The decoder layers' attention modules look their function up by `config._attn_implementation`; each MemoryLLM
attention module gets a view of the model's config (`PrefixAttentionConfig`) that names `memoryllm_sdpa` where the
model's config names `sdpa`, and everything else from the model's config as it is now.
"""

import torch
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface


PREFIX_SDPA = "memoryllm_sdpa"
# `enable_gqa` came with torch 2.5.
GQA_AVAILABLE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)
# Queries per sdpa call of a masked prefill (64 was fastest for an injection of 512 tokens behind 257 prefix rows).
QUERY_CHUNK = 64


def prefix_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """`sdpa_attention_forward`, except on the CPU with grouped heads: a decode step (one query) as two matrix
    products on the key/value heads as they are, and a longer query with a mask as grouped-query sdpa calls by
    chunks of queries. Returns `[B, q, H, hd]` and no weights, as transformers' function does."""
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None and not (module.training and dropout)
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1  # one mask for all heads
    if grouped and plain and shared_mask and query.device.type == "cpu" and query.shape[2] == 1:
        return decode_attention(query, key, value, attention_mask, scaling), None
    if not (grouped and plain and GQA_AVAILABLE and attention_mask is not None and query.device.type == "cpu"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return causal_chunks_attention(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None


def causal_chunks_attention(query, key, value, attention_mask, scaling) -> torch.Tensor:
    """Grouped-query sdpa with a mask, by chunks of `QUERY_CHUNK` queries, each over the keys up to its last row:
    the queries are the last rows of the keys and see no later key, so the keys a chunk skips are all masked (with
    a mask, sdpa computes every query-key pair; the chunks skip most of the causal triangle). `[B, H, q, hd]`."""
    query_length, key_length = query.shape[2], key.shape[2]
    per_query = attention_mask.shape[2] == query_length  # else one mask row shared by the queries
    if query_length <= QUERY_CHUNK or query_length > key_length or 4 * query_length < key_length:  # < 1/8 saved
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
        )
    chunks = []
    for start in range(0, query_length, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, query_length)
        end = key_length - query_length + stop  # keys up to the chunk's last query
        mask = attention_mask[:, :, start:stop, :end] if per_query else attention_mask[..., :end]
        chunk = query[:, :, start:stop]
        keys, values = key[:, :, :end], value[:, :, :end]
        chunks.append(
            F.scaled_dot_product_attention(chunk, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
        )
    return torch.cat(chunks, dim=2)


def decode_attention(query, key, value, attention_mask, scaling) -> torch.Tensor:
    """One query row per head `[B, H, 1, hd]` over keys/values `[B, Hkv, S, hd]`: the query heads of a group are the
    rows of one matrix product with their key/value head, so each key and value row is read once (a decode step at
    batch 1 is bound by reading them). Returns `[B, 1, H, hd]`."""
    batch, heads, _, head_dim = query.shape
    groups = key.shape[1]
    scale = head_dim**-0.5 if scaling is None else scaling
    rows = query.reshape(batch, groups, heads // groups, head_dim) * scale
    scores = torch.matmul(rows, key.transpose(-1, -2))  # [B, Hkv, H / Hkv, S]
    if attention_mask is not None:  # [B or 1, 1, 1, S]: one row shared by the heads
        bool_mask = attention_mask.dtype == torch.bool
        scores = scores.masked_fill(~attention_mask, float("-inf")) if bool_mask else scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(weights, value).reshape(batch, 1, heads, head_dim)


AttentionInterface.register(PREFIX_SDPA, prefix_sdpa_attention)


class PrefixAttentionConfig:
    """What an attention module reads of the model's config: the config itself, live, except that `sdpa` reads as
    `memoryllm_sdpa` (so changing the model's attention implementation reaches the layers as before)."""

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    @property
    def _attn_implementation(self):
        implementation = self._config._attn_implementation
        return PREFIX_SDPA if implementation == "sdpa" else implementation

    def __getattr__(self, name: str):
        if name == "_config" or name.startswith("__"):  # not set yet (copy, pickle): no attribute of the config
            raise AttributeError(name)
        return getattr(self._config, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._config, name, value)

    def __repr__(self) -> str:
        return f"PrefixAttentionConfig({self._config.__class__.__name__})"


def use_prefix_attention(model) -> None:
    """Route the sdpa attention of every decoder layer of `model` (a `LlamaModel`) through `prefix_sdpa_attention`."""
    for layer in model.layers:
        layer.self_attn.config = PrefixAttentionConfig(model.config)


__all__ = ["PREFIX_SDPA", "PrefixAttentionConfig", "prefix_sdpa_attention", "use_prefix_attention"]
