"""
Injection: the pass that turns text into new memory rows, and the chunking and batching around it.

One pass runs the injection adapter over `[bos, last N memory rows, text]` (or the text alone into an empty memory);
the variant's `injection_plan` lays it out and its `written_rows` picks the rows each layer writes. Long text is
split into chunks injected in order; chunks of several states that can share one padded forward run batched.
"""

import torch
from transformers.masking_utils import create_causal_mask
from transformers.utils import logging

from .cache_memoryllm import (
    MemoryPrefixCache,
    checkpointed,
    injection_prefix,
    layer_key_values,
    prefixed_mask,
    text_positions,
)
from .lora import active_adapter
from .memory_state import MemoryState, MemoryUpdate
from .variants import InjectionPlan


# Progress bars are shown for injections of more chunks than this.
PROGRESS_MIN_CHUNKS = 4


def injection_pass(
    model, input_ids: torch.Tensor, states: list[MemoryState], attention_mask=None, text_rows: bool = True
):
    """Delta `[B, L, n, d]` and the last layer's text rows `[B, T, d]` of one injection pass of `input_ids`. Without
    `text_rows` (`None` is returned for them), the last layer computes only the rows that the variant writes."""
    config, (batch_size, length) = model.config, input_ids.shape
    initialized = states[0].initialized
    plan = model.variant.injection_plan(initialized, length)
    cache, prefix = _injection_cache(model, states, plan, length, batch_size)
    hidden = model.model.embed_tokens(input_ids)  # [B, T, d]
    query_length = plan.memory_queries + length
    positions = text_positions(attention_mask, prefix[0], prefix[0], query_length, hidden.device)
    mask = create_causal_mask(
        config=config,
        inputs_embeds=hidden.new_empty(batch_size, query_length, 0),
        attention_mask=prefixed_mask(attention_mask, prefix, batch_size, query_length),
        position_ids=positions,
        **{model.cache_kwarg: cache},
    )
    inputs = {"attention_mask": mask, "position_ids": positions, "use_cache": True, model.cache_kwarg: cache}
    inputs["position_embeddings"] = model.model.rotary_emb(hidden, positions)
    e, last = model.new_memory_positional_emb, config.num_hidden_layers - 1  # e: [1, 1, d]
    read = None if text_rows else model.variant.output_rows_read(plan)
    deltas = []
    with active_adapter(config.injection_adapter):
        for idx, layer in enumerate(model.model.layers):
            queries = injection_queries(hidden, states, idx, plan, e)
            outputs = layer_outputs(layer, idx, queries, inputs, cache, read if idx == last else None)
            deltas.append(model.variant.written_rows(queries, outputs, idx, plan, initialized, e))
            hidden = outputs[:, -length:] if idx < last or text_rows else None
    return torch.stack(deltas, dim=1), hidden


def layer_outputs(layer, idx: int, queries: torch.Tensor, inputs: dict, cache, rows: int | None):
    """
    Layer `idx`'s outputs for `queries` `[B, S_q, d]`: all rows (`rows=None`), none (`0`), or only the last `rows`,
    when nothing reads the others: those then only give the keys/values that the last rows attend to. A slice
    needs a cache that stores rows (not a read-only one) and a 4-D mask (sdpa, eager) to hold the other rows' keys
    and their causal pattern.
    """
    skip = 0 if rows is None else queries.shape[1] - rows
    mask = inputs["attention_mask"]
    if rows == 0:
        return None
    if skip <= 0 or cache is None or cache.read_only or not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        return layer(queries, **inputs)
    cos, sin = inputs["position_embeddings"]
    keys, values = layer_key_values(layer, queries[:, :skip], position_embeddings=(cos[:, :skip], sin[:, :skip]))
    cache.update(keys, values, idx)
    sliced = {
        **inputs,
        "attention_mask": mask[:, :, skip:],
        "position_ids": inputs["position_ids"][:, skip:],
        "position_embeddings": (cos[:, skip:], sin[:, skip:]),
    }
    return layer(queries[:, skip:], **sliced)


def _injection_cache(model, states, plan: InjectionPlan, length: int, batch_size: int):
    """A cache holding the prefix `[bos, memory rows]` the pass reads (or `None`), and its `(length, written)`."""
    if not plan.reads_memory:
        return None, (0, None)
    num_tokens, rows = model.config.num_tokens, model.config.memory_rows
    read = slice(rows - num_tokens, rows - plan.memory_queries)
    cache = MemoryPrefixCache(read_only=checkpointed(model))  # a checkpointed layer runs twice
    cache.attach_prefix([injection_prefix(model, states, read, plan.memory_queries + length)], batch_size)
    return cache, (cache.prefix_length, cache.prefix_written)


def injection_queries(hidden, states, idx: int, plan: InjectionPlan, e) -> torch.Tensor:
    """Layer `idx`'s query rows `[B, S_q, d]`: memory rows that act as queries (short text), then the text; `e` is
    added to the last `num_new` rows when the plan says so."""
    if plan.memory_queries:
        rows = [s.memory[idx, -plan.memory_queries :].to(hidden.device, hidden.dtype) for s in states]
        hidden = torch.cat([torch.stack(rows).expand(hidden.shape[0], -1, -1), hidden], dim=1)
    if not plan.add_new_memory_embedding:
        return hidden
    num_new = plan.num_new
    return torch.cat([hidden[:, :-num_new], hidden[:, -num_new:] + e.to(hidden.dtype)], dim=1)


class PendingState:
    """
    A state that one `inject`/`injected` call writes into: the caller's state, never written before the commit, and
    the update of its last chunk, not applied yet. When a later chunk must read an earlier chunk's update, that
    update goes into a private copy (one pass), updated in place from then on (outside autograd).
    """

    def __init__(self, state: MemoryState):
        self.original = self.current = state
        self.update: MemoryUpdate | None = None

    def read(self) -> MemoryState:
        """The state the next chunk reads, every earlier update applied (never to the caller's state)."""
        if self.update is not None:
            if self.current is self.original or torch.is_grad_enabled():
                self.current = self.current.updated(self.update)
            else:
                self.current.update_(self.update)
            self.update = None
        return self.current

    def result(self) -> MemoryState:
        """The new state; the caller's state is left alone (`injected`)."""
        return self.read()

    def commit(self) -> None:
        """Write the new state into the caller's state in place, with one pass over its memory (`inject`)."""
        if self.update is not None:
            source = None if self.current is self.original else self.current
            self.original.update_(self.update, source=source)
        elif self.current is not self.original:
            self.original.take(self.current)


def inject_chunks(model, token_chunks, states, generator, show_progress) -> list[PendingState]:
    """Inject chunk `r` of every input in round `r`; returns each state's pending result (nothing committed)."""
    working = [PendingState(state) for state in states]
    rounds = max(len(chunks) for chunks in token_chunks)
    total = sum(len(chunks) for chunks in token_chunks)
    show = total > PROGRESS_MIN_CHUNKS if show_progress is None else show_progress
    with logging.tqdm(total=total, desc="Injecting", unit="chunk", disable=not show) as progress:
        for round_idx in range(rounds):
            items = [(i, chunks[round_idx]) for i, chunks in enumerate(token_chunks) if round_idx < len(chunks)]
            for group in batches(items, working, model.config.num_tokens):
                inject_group(model, group, working, generator)
                progress.update(len(group))
    return working


def batches(items: list[tuple[int, list[int]]], working, num_tokens: int) -> list[list[tuple[int, list[int]]]]:
    """Group items that can share one padded forward: same initialisation, and either >= N tokens or the same
    length (short text uses memory rows as queries, whose count depends on the length)."""
    groups: dict[tuple, list] = {}
    for index, ids in items:
        short = len(ids) < num_tokens
        groups.setdefault((working[index].read().initialized, len(ids) if short else -1), []).append((index, ids))
    return list(groups.values())


def inject_group(model, group, working: list[PendingState], generator) -> None:
    """One padded pass over `group`'s chunks (left padding); each row's delta becomes its own state's pending
    update."""
    device = model.model.embed_tokens.weight.device
    longest = max(len(ids) for _, ids in group)
    input_ids = torch.zeros(len(group), longest, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, (_, ids) in enumerate(group):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, device=device)
        attention_mask[row, longest - len(ids) :] = 1
    padded = bool((attention_mask == 0).any())  # only rows of >= N tokens are grouped with padding
    states = [working[index].read() for index, _ in group]
    delta, _ = injection_pass(model, input_ids, states, attention_mask if padded else None, text_rows=False)
    for row, (index, _) in enumerate(group):
        state = states[row]
        row_generator = generator[index] if isinstance(generator, (list, tuple)) else generator
        update = model.variant.planned_update(state, delta[row], state.injections + 1, row_generator, model=model)
        working[index].update = update


__all__ = ["PendingState", "inject_chunks", "injection_pass", "injection_queries"]
