"""
The floor of every ratio the benchmark measures: the ratio it would have if MemoryLLM's extra work cost only what
it must, at the baseline's own speed. Compute-bound steps (a prefill, an injection pass) count FLOPs; bandwidth-bound
steps (a decode step at batch 1) count bytes read.

* FLOPs: 2 per multiply-add of every projection (LoRA of the adapter in use included), `4 * heads * head_dim` per
  query-key pair of attention (scores and values), 2 per multiply-add of the LM head on the positions whose logits
  are kept. Norms, RoPE, softmax and residuals are left out (well under 1%).
* Bytes: every weight a decode step reads (the layers' projections and the adapter in use, the norms, the LM head)
  and the cached keys/values it attends to (`2 * layers * rows * kv_heads * head_dim * element size`).
* The injection's state update is one pass over the memory (read and write); its floor share is the time of one
  copy of the memory measured in the same run, relative to the plain forward.
"""

from dataclasses import dataclass

from modeling_memoryllm import MemoryLLMForCausalLM


@dataclass(frozen=True)
class Shape:
    """The sizes of a model that its FLOPs and bytes follow from."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_rank: int
    lora_targets: tuple[str, ...]
    prefix: int  # rows in front of every query: bos + memory
    element_size: int

    @classmethod
    def of(cls, model: MemoryLLMForCausalLM) -> "Shape":
        config = model.config
        lora = config.lora_config or {}
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            vocab=config.vocab_size,
            lora_rank=lora.get("r", 0),
            lora_targets=tuple(lora.get("target_modules", ())),
            prefix=config.prefix_length,
            element_size=model.dtype.itemsize,
        )

    def projections(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of every projection of a layer."""
        attention, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, attention),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (attention, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    def _weights(self, names) -> int:
        """Multiply-adds per row (= weights) of the projections `names`, with their LoRA factors."""
        total = 0
        for name in names:
            inputs, outputs = self.projections()[name]
            total += inputs * outputs + (self.lora_rank * (inputs + outputs) if name in self.lora_targets else 0)
        return total

    def layer_flops(self, rows: int) -> float:
        """FLOPs of one layer's projections over `rows` rows."""
        return 2.0 * rows * self._weights(self.projections())

    def key_value_flops(self, rows: int) -> float:
        """FLOPs of one layer's key and value projections over `rows` rows (a prefix's keys/values)."""
        return 2.0 * rows * self._weights(("k_proj", "v_proj"))

    def attention_flops(self, pairs: float) -> float:
        """FLOPs of one layer's attention over `pairs` query-key pairs."""
        return 4.0 * pairs * self.heads * self.head_dim

    def head_flops(self, rows: int) -> float:
        return 2.0 * rows * self.hidden * self.vocab

    def weight_bytes(self) -> float:
        """Bytes of the weights one decode step reads: every projection and its adapter, norms, the LM head."""
        per_layer = self._weights(self.projections()) + 2 * self.hidden
        return float((self.layers * per_layer + self.hidden * self.vocab + self.hidden) * self.element_size)

    def key_value_bytes(self, rows: int) -> float:
        """Bytes of the cached keys and values of `rows` rows in every layer."""
        return 2.0 * self.layers * rows * self.kv_heads * self.head_dim * self.element_size


def causal_pairs(queries: int, before: int = 0) -> float:
    """Query-key pairs of `queries` causal rows that also see `before` earlier rows."""
    return queries * before + queries * (queries + 1) / 2


def ttft_floor(shape: Shape, query: int, read: int | None = None) -> dict:
    """A prefill of `query` tokens with the prefix cached vs the plain backbone (last-position logits only); the
    query attends to `read` prefix rows (default: all `P`; fewer with `memory_read: relevant`)."""
    read = shape.prefix if read is None else read
    common = shape.layers * shape.layer_flops(query) + shape.head_flops(1)
    plain = common + shape.layers * shape.attention_flops(causal_pairs(query))
    memory = common + shape.layers * shape.attention_flops(causal_pairs(query, read))
    return {
        "bound": "compute",
        "prefix_rows_read": read,
        "memory_flops": memory,
        "plain_flops": plain,
        "ratio": memory / plain,
    }


def recompute_expectation(shape: Shape, query: int, read: int | None = None) -> dict:
    """A prefill with the prefix recomputed per call (the original code) vs cached: the cached prefill (attending to
    `read` rows) plus the whole prefix's key/value projections in every layer (`L * 2 * P * Wkv` FLOPs). Not a
    floor but the ratio the cache saves at most if both run at the same rate: a target above it asks for more than
    the FLOPs allow."""
    cached = ttft_floor(shape, query, read)["memory_flops"]
    recomputed = cached + shape.layers * shape.key_value_flops(shape.prefix)
    return {"bound": "compute", "cached_flops": cached, "recompute_flops": recomputed, "ratio": recomputed / cached}


def injection_floor(model: MemoryLLMForCausalLM, tokens: int, memory_pass_share: float | None) -> dict:
    """One injection of `tokens` tokens into a full memory vs a plain forward over them with all logits: the pass
    (its prefix keys/values, attention behind them, only the written rows in the last layer) plus one pass over the
    memory (`memory_pass_share`: one copy of the memory / the plain forward, measured)."""
    shape, config = Shape.of(model), model.config
    plan = model.variant.injection_plan(True, tokens)
    queries = plan.memory_queries + tokens
    prefix = int(config.add_bos_embedding) + config.num_tokens - plan.memory_queries if plan.reads_memory else 0
    read = model.variant.output_rows_read(plan)  # rows the last layer computes
    pairs = causal_pairs(queries, prefix)
    last_layer_pairs = causal_pairs(queries, prefix) - causal_pairs(queries - read, prefix)
    unread = queries - read if read else 0  # the last layer's other rows: keys and values only (none: no layer)
    last = shape.key_value_flops(unread) + shape.layer_flops(read) + shape.attention_flops(last_layer_pairs)
    layers = (shape.layers - 1) * (shape.layer_flops(queries) + shape.attention_flops(pairs))
    injection = layers + last + shape.layers * shape.key_value_flops(prefix)
    plain = shape.layers * (shape.layer_flops(tokens) + shape.attention_flops(causal_pairs(tokens)))
    plain += shape.head_flops(tokens)
    ratio = injection / plain + (memory_pass_share or 0.0)
    return {
        "bound": "compute (the pass) + bandwidth (one pass over the memory)",
        "injection_flops": injection,
        "plain_flops": plain,
        "memory_pass_share": memory_pass_share,
        "ratio": ratio,
    }


def decode_floor(shape: Shape, past: int, read: int | None = None) -> dict:
    """A greedy decode step at batch 1 after `past` tokens: weights plus cached keys/values, prefix (the `read` rows
    the query attends to; default all `P`) vs none."""
    read = shape.prefix if read is None else read
    plain = shape.weight_bytes() + shape.key_value_bytes(past)
    memory = plain + shape.key_value_bytes(read)
    return {
        "bound": "bandwidth",
        "prefix_rows_read": read,
        "memory_bytes": memory,
        "plain_bytes": plain,
        "ratio": memory / plain,
    }


__all__ = ["Shape", "causal_pairs", "decode_floor", "injection_floor", "recompute_expectation", "ttft_floor"]
