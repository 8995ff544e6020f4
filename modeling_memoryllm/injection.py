"""
Injection: the pass that turns text into new memory rows, and the chunking and batching around it.

One pass runs the injection adapter over `[bos, last N memory rows, text]` (or the text alone into an empty memory);
the variant's `injection_plan` lays it out and its `written_rows` picks the rows each layer writes. Long text is
split into chunks injected in order; chunks of several states that can share one padded forward run batched.
"""

import torch
from transformers.masking_utils import create_causal_mask
from transformers.utils import logging

from .cache_memoryllm import MemoryPrefixCache, checkpointed, injection_prefix, prefixed_mask, text_positions
from .lora import active_adapter
from .memory_state import MemoryState
from .variants import InjectionPlan


# Progress bars are shown for injections of more chunks than this.
PROGRESS_MIN_CHUNKS = 4


def injection_pass(model, input_ids: torch.Tensor, states: list[MemoryState], attention_mask=None):
    """Delta `[B, L, n, d]` and the last layer's text rows `[B, T, d]` of one injection pass of `input_ids`."""
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
    position_embeddings = model.model.rotary_emb(hidden, positions)
    e = model.new_memory_positional_emb  # [1, 1, d]
    deltas = []
    with active_adapter(config.injection_adapter):
        for idx, layer in enumerate(model.model.layers):
            queries = injection_queries(hidden, states, idx, plan, e)
            outputs = layer(
                queries,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=position_embeddings,
                use_cache=True,
                **{model.cache_kwarg: cache},
            )
            deltas.append(model.variant.written_rows(queries, outputs, idx, plan, initialized, e))
            hidden = outputs[:, -length:]
    return torch.stack(deltas, dim=1), hidden


def _injection_cache(model, states, plan: InjectionPlan, length: int, batch_size: int):
    """A cache holding the prefix `[bos, memory rows]` the pass reads (or `None`), and its `(length, written)`."""
    if not plan.reads_memory:
        return None, (0, None)
    num_tokens, rows = model.config.num_tokens, model.config.memory_rows
    read = slice(rows - num_tokens, rows - plan.memory_queries)
    prefixes = [injection_prefix(model, state, read, plan.memory_queries + length) for state in states]
    cache = MemoryPrefixCache(read_only=checkpointed(model))  # a checkpointed layer runs twice
    cache.attach_prefix(prefixes, batch_size)
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


def inject_chunks(model, token_chunks, states, generator, show_progress) -> list[MemoryState]:
    """Inject chunk `r` of every input in round `r`; returns new (uncommitted) states."""
    working = list(states)
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
        groups.setdefault((working[index].initialized, len(ids) if short else -1), []).append((index, ids))
    return list(groups.values())


def inject_group(model, group, working: list[MemoryState], generator) -> None:
    """One padded pass over `group`'s chunks (left padding); each row's delta updates its own working state."""
    device = model.model.embed_tokens.weight.device
    longest = max(len(ids) for _, ids in group)
    input_ids = torch.zeros(len(group), longest, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, (_, ids) in enumerate(group):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, device=device)
        attention_mask[row, longest - len(ids) :] = 1
    padded = bool((attention_mask == 0).any())  # only rows of >= N tokens are grouped with padding
    delta, _ = injection_pass(
        model, input_ids, [working[index] for index, _ in group], attention_mask if padded else None
    )
    for row, (index, _) in enumerate(group):
        state = working[index]
        row_generator = generator[index] if isinstance(generator, (list, tuple)) else generator
        working[index] = model.variant.update(state, delta[row], state.injections + 1, row_generator, model=model)


__all__ = ["inject_chunks", "injection_pass", "injection_queries"]
