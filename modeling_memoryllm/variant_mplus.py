"""
M+ (Wang et al., ICML 2025; `YuWangX/mplus-8b`; SEMANTICS-MPLUS.md) as a memory variant.

MemoryLLM-8B plus a long-term memory (LTM) per layer on the CPU and a co-trained retriever. What differs:
- the short-term memory (STM) has `(num_blocks - num_ltm_blocks) * N` rows; every forward reads
  `[bos, k retrieved LTM rows (oldest first), STM, text]` at contiguous positions, `k = num_ltm_blocks * N`;
- retrieval is per layer, from that layer's input rows of the text (normalised by its input layernorm), scored
  against the stored keys of the LTM and the buffer; decode steps reuse what the prefill retrieved;
- an update drops N STM rows per layer (always per layer) into a CPU buffer with their keys and ages, and every
  `update_ltm_frequency` updates the buffer is merged into the LTM, where rows decay and are pruned.

Deliberate differences from the original (documented in the README): every batch row retrieves for itself and
reads its own memory (the original reads row 0 and crashes at batch > 1); ties in age are broken by a stable rule
(stable ascending sort by age, reversed: among equal ages the later candidate comes first), where the original's
order is undefined; a memory with never-written STM rows (a new one) fills them before dropping and does not read them.
"""

import math
from typing import ClassVar

import torch
from torch import nn

from .cache_memoryllm import MemoryPrefixCache, layer_key_values
from .memory_state import EMPTY_ROWS
from .memory_state_mplus import MPlusMemoryState
from .variants import InjectionPlan, MemoryLLM8B, register_variant


PRUNE_THRESHOLD = 0.01  # rows with a recall frequency at or below this leave the LTM at a merge


def projector(config) -> nn.Module:
    """A retriever projector `d -> s`: `W2 act(W1 x)` with `num_selector_layers = 2`, a single linear map with 1."""
    width, hidden = config.selector_hidden_dim, config.hidden_size
    if getattr(config, "num_selector_layers", 2) == 1:
        return nn.Linear(hidden, width, bias=False)
    return nn.Sequential(nn.Linear(hidden, 2 * width, bias=False), nn.SiLU(), nn.Linear(2 * width, width, bias=False))


@register_variant
class MPlus(MemoryLLM8B):
    name = "mplus"
    state_class: ClassVar[type] = MPlusMemoryState

    # ------------------------------------------------------------------------------------------------- config
    @classmethod
    def recognises(cls, raw: dict) -> bool:
        return "num_ltm_blocks" in raw or "MPlus" in (raw.get("architectures") or ())

    @classmethod
    def adapt_config(cls, config) -> None:
        """Only the released `update_ltm_mode="immediate"` exists (the original fails on any other value later)."""
        mode = getattr(config, "update_ltm_mode", "immediate")
        if mode != "immediate":
            raise ValueError(f"M+ supports update_ltm_mode='immediate' only (the released mode), got {mode!r}.")
        if config.num_ltm_blocks >= config.num_blocks:
            raise ValueError("num_blocks counts short- and long-term blocks: it must exceed num_ltm_blocks.")

    @classmethod
    def memory_rows(cls, config) -> int:
        return (config.num_blocks - config.num_ltm_blocks) * config.num_tokens

    @classmethod
    def prefix_slots(cls, config) -> int:
        return config.num_ltm_blocks * config.num_tokens

    @classmethod
    def prefix_length(cls, config) -> int:
        return int(config.add_bos_embedding) + cls.prefix_slots(config) + cls.memory_rows(config)

    @classmethod
    def drops_per_layer(cls, config) -> bool:
        return True

    def build(self, model) -> None:
        """The retriever projectors of every layer and the checkpoint's LTM parameters (`ltm.{l}`, ...)."""
        config, layers = self.config, model.model.layers
        for idx, layer in enumerate(layers):
            for name in ("query_proj", "key_proj", "encoder_query_proj"):  # the encoder one is loaded, never used
                setattr(layer.self_attn, name, projector(config))
            layer.register_forward_pre_hook(_retrieval_hook(idx), with_kwargs=True)
        rows, width, keys = config.ltm_initial_size, config.hidden_size, config.selector_hidden_dim
        shapes = {
            "ltm": (rows, width),
            "ltm_keys": (rows, keys),
            "ltm_ages": (rows,),
            "ltm_recall_frequencies": (rows,),
        }
        for name, shape in shapes.items():
            params = [nn.Parameter(torch.zeros(shape), requires_grad=False) for _ in layers]
            setattr(model, name, nn.ParameterList(params))

    def bind_state(self, model, like=None) -> MPlusMemoryState:
        """The model's own memory: its STM parameter, with the checkpoint's LTM (ages truncated to integers)."""
        if like is not None and like.memory.data_ptr() == model.memory.data_ptr():
            return like
        ltm = {
            "ltm": [p.detach().cpu() for p in model.ltm],
            "ltm_keys": [p.detach().cpu() for p in model.ltm_keys],
            "ltm_ages": [p.detach().cpu().int().double() for p in model.ltm_ages],
            "ltm_rf": [p.detach().cpu().double() for p in model.ltm_recall_frequencies],
        }
        return MPlusMemoryState(model.memory.data, ltm=ltm)

    # ---------------------------------------------------------------------------------------------- injection
    def injection_plan(self, initialized: bool, length: int) -> InjectionPlan:
        return super().injection_plan(True, length)  # no first-injection rule: the LTM plays no part either

    def written_rows(self, queries, outputs, layer: int, plan: InjectionPlan, initialized: bool, e) -> torch.Tensor:
        return outputs[:, -plan.num_new :]

    # ------------------------------------------------------------------------------------------------- update
    def update(self, state, delta, injection: int, generator=None, model=None) -> MPlusMemoryState:
        """Drop into the buffer (per layer), age, append the delta; merge every `update_ltm_frequency` updates."""
        if model is None:
            raise ValueError("An M+ update computes retriever keys: pass the model.")
        delta = delta.to(device=state.memory.device, dtype=state.memory.dtype)  # [L, n, d]
        kept, gone = self._drop_indices(state, delta.shape[1], generator)  # [L, M - n], [L, n]
        new = self._stm_after(state, kept, gone, delta, injection)
        dropped = state.memory.gather(1, gone.to(state.memory.device).unsqueeze(-1).expand(-1, -1, delta.shape[2]))
        dropped_ages = state.stm_ages.gather(1, gone)
        ltm_ages = [ages + delta.shape[1] for ages in state.ltm_ages]
        buffer_ages = state.buffer_ages + delta.shape[1]
        keys = retriever_keys(model, dropped)  # [L, n, s], with the current weights
        rows = torch.cat([state.buffer_rows, dropped.cpu().to(state.buffer_rows.dtype)], dim=1)
        keys = torch.cat([state.buffer_keys, keys.cpu().to(state.buffer_keys.dtype)], dim=1)
        ages = torch.cat([buffer_ages, dropped_ages], dim=1)
        ltm = {**state.ltm_parts(), "ltm_ages": ltm_ages}
        new = new.replaced(ltm=ltm, buffer=(rows, keys, ages), update_step=state.update_step + delta.shape[1])
        if new.update_step >= self.config.update_ltm_frequency * self.config.num_tokens:
            new = self.merged(new)
        return new

    def _drop_indices(self, state, new_rows: int, generator):
        """Per layer, ascending kept and gone STM rows: never-written rows go first; else one `randperm` per layer."""
        num_rows = state.memory.shape[1]
        empty = (state.provenance[0] == EMPTY_ROWS).nonzero().squeeze(1)
        kept, gone = [], []
        for _ in range(self.config.num_hidden_layers):
            if len(empty) >= new_rows:
                order = torch.cat([empty[:new_rows], _others(num_rows, empty[:new_rows])])
                order = torch.cat([order[new_rows:], order[:new_rows]])
            else:
                order = torch.randperm(num_rows, generator=generator)
            kept.append(order[: num_rows - new_rows].sort().values)
            gone.append(order[num_rows - new_rows :].sort().values)
        return torch.stack(kept), torch.stack(gone)

    def _stm_after(self, state, kept, gone, delta, injection: int) -> MPlusMemoryState:
        """`[STM rows at kept; delta]` with ages `[kept ages; n-1, ..., 0]` (a new state, LTM and buffer shared)."""
        appended = state.appended(kept, delta, injection)
        arrival = torch.arange(delta.shape[1] - 1, -1, -1, dtype=torch.float64).expand(kept.shape[0], -1)
        stm_ages = torch.cat([state.stm_ages.gather(1, kept), arrival], dim=1)
        return state.replaced(
            memory=appended.memory, stm_ages=stm_ages, provenance=appended.provenance, injections=injection
        )

    def merged(self, state: MPlusMemoryState) -> MPlusMemoryState:
        """MERGE: the buffer joins the LTM; recall frequencies decay; rows at or below the threshold go, unless that
        would leave `k` or fewer rows (then nothing goes and the decay is undone). The buffer empties."""
        config, slots = self.config, self.prefix_slots(self.config)
        decay, initial_rf = config.decay_frequency, config.initial_rf_when_moving_stm_to_ltm
        parts = {name: [] for name in ("ltm", "ltm_keys", "ltm_ages", "ltm_rf")}
        for layer in range(config.num_hidden_layers):
            rows = torch.cat([state.ltm[layer], state.buffer_rows[layer].to(state.ltm[layer].dtype)])
            keys = torch.cat([state.ltm_keys[layer], state.buffer_keys[layer].to(state.ltm_keys[layer].dtype)])
            ages = torch.cat([state.ltm_ages[layer], state.buffer_ages[layer]])
            added = torch.full((state.buffer_rows.shape[1],), float(initial_rf), dtype=torch.float64)
            rf = torch.cat([state.ltm_rf[layer], added]) - decay
            survivors = rf > PRUNE_THRESHOLD
            if int(survivors.sum()) > slots:
                rows, keys, ages, rf = rows[survivors], keys[survivors], ages[survivors], rf[survivors]
            else:
                rf = rf + decay
            for name, value in zip(parts, (rows, keys, ages, rf)):
                parts[name].append(value)
        buffer = (state.buffer_rows[:, :0], state.buffer_keys[:, :0], state.buffer_ages[:, :0])
        return state.replaced(ltm=parts, buffer=buffer, update_step=0)

    # ------------------------------------------------------------------------------------------------ reading
    def reads(self, state) -> bool:
        return True

    def retrieval(self, model, states, attention_mask, batch_size: int) -> "Retrieval":
        return Retrieval(self, states, attention_mask, batch_size, model.model.rotary_emb)

    def prefix_written(self, state, rows: slice = slice(None)) -> torch.Tensor | None:
        """The bos row, the LTM slots (unless the LTM is empty) and the written STM rows."""
        stm = state.written_rows(rows)
        slots = self.prefix_slots(self.config)
        if stm is None and min(state.ltm_rows) > 0:
            return None
        stm = stm if stm is not None else torch.ones(len(range(*rows.indices(state.memory.shape[1]))), dtype=torch.bool)
        bos = torch.ones(int(self.config.add_bos_embedding), dtype=torch.bool)
        return torch.cat([bos, torch.full((slots,), min(state.ltm_rows) > 0), stm])

    def retrieve(self, layer: nn.Module, layer_idx: int, hidden: torch.Tensor, state) -> torch.Tensor:
        """RETRIEVE_l: candidate indices `[k]` into `[LTM ; buffer]` in slot order, for text rows `hidden` `[T, d]`."""
        slots = self.prefix_slots(self.config)
        count = state.ltm_rows[layer_idx]
        if count < slots:  # small LTM: 0..n-1 repeated, the last k entries; the buffer is ignored
            chosen = torch.arange(count).repeat(math.ceil(slots / count))[-slots:]
        else:
            stored = state.ltm_keys[layer_idx]
            keys = torch.cat([stored, state.buffer_keys[layer_idx].to(stored.dtype)])
            scores = retrieval_scores(layer, hidden, keys)  # [n + c]
            chosen = scores.topk(slots).indices.sort().values.cpu()
        ages = torch.cat([state.ltm_ages[layer_idx], state.buffer_ages[layer_idx]])[chosen]
        return chosen[torch.argsort(ages, stable=True).flip(0)]  # oldest first; ties: the later candidate first

    def retrieved_rows(self, state, layer_idx: int, indices: torch.Tensor) -> torch.Tensor:
        """The rows `[k, d]` of `[LTM ; buffer]` at `indices`, gathered on the CPU."""
        ltm = state.ltm[layer_idx]
        rows = torch.cat([ltm, state.buffer_rows[layer_idx].to(ltm.dtype)]) if state.buffer_rows.shape[1] else ltm
        return rows[indices]


def _others(num_rows: int, taken: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(num_rows, dtype=torch.bool)
    keep[taken] = False
    return keep.nonzero().squeeze(1)


def retrieval_scores(layer: nn.Module, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`score_j = mean_t sigmoid(q_t . key_j)` with `q = query_proj(input_layernorm(hidden))`: `[T, d] -> [n]`."""
    queries = layer.self_attn.query_proj(layer.input_layernorm(hidden))  # [T, s]
    return torch.sigmoid(queries @ keys.to(queries.device, queries.dtype).T).mean(0)


def retriever_keys(model, rows: torch.Tensor) -> torch.Tensor:
    """Keys `[L, n, s]` of rows `[L, n, d]`: `key_proj_l(input_layernorm_l(row))` per layer."""
    keys = []
    for layer, layer_rows in zip(model.model.layers, rows):
        weight = layer.input_layernorm.weight
        keys.append(layer.self_attn.key_proj(layer.input_layernorm(layer_rows.to(weight.device, weight.dtype))))
    return torch.stack(keys)


def _retrieval_hook(layer_idx: int):
    """A forward pre-hook for decoder layer `layer_idx`: at the prefill, fill the cache's LTM slots of this layer."""

    def hook(layer, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        retrieval = getattr(cache, "retrieval", None) if isinstance(cache, MemoryPrefixCache) else None
        if retrieval is not None:
            retrieval.fill(layer, layer_idx, args[0] if args else kwargs["hidden_states"], cache)
        return None

    return hook


class Retrieval:
    """The retrieval of one prefill: every batch row retrieves for itself, from its own memory's LTM and buffer."""

    def __init__(self, variant: MPlus, states, attention_mask, batch_size: int, rotary_emb):
        self.variant, self.attention_mask, self.rotary_emb = variant, attention_mask, rotary_emb
        self.states = states if len(states) == batch_size else states * batch_size
        self.indices: dict[int, list[torch.Tensor]] = {}  # per layer, per row: candidate indices in slot order

    def fill(self, layer, layer_idx: int, hidden: torch.Tensor, cache: MemoryPrefixCache) -> None:
        """Write the keys/values of the retrieved rows into slots `b .. b+k-1` of this layer's cache (once)."""
        if layer_idx in self.indices:
            return
        start = int(self.variant.config.add_bos_embedding)
        chosen = []
        for row, state in enumerate(self.states):
            if min(state.ltm_rows) == 0:
                chosen.append(torch.zeros(0, dtype=torch.long))
                continue
            text = hidden[row] if self.attention_mask is None else hidden[row][self.attention_mask[row].bool()]
            indices = self.variant.retrieve(layer, layer_idx, text, state)
            rows = self.variant.retrieved_rows(state, layer_idx, indices).to(hidden.device, hidden.dtype)
            keys, values = layer_key_values(layer, rows.unsqueeze(0), self.rotary_emb, start=start)
            cache.layers[layer_idx].write_rows(row, start, keys[0], values[0])
            chosen.append(indices)
        self.indices[layer_idx] = chosen


__all__ = ["MPlus", "MPlusMemoryState", "Retrieval", "retrieval_scores", "retriever_keys"]
