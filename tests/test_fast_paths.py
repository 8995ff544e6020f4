"""The fast paths agree with the plain ones: the in-place update of `inject` with the functional update, the last
layer of an injection that computes only the rows it writes with the full layer, grouped-query attention with the
expanded one, and a prefix buffer grown in place with a private copy."""

import pytest
import torch

from modeling_memoryllm import MemoryState
from modeling_memoryllm.memory_state import MemoryUpdate
from tests.conftest import assert_close
from tests.tiny import tiny_model


def random_state(layers=2, rows=12, hidden=8, seed=0) -> MemoryState:
    generator = torch.Generator().manual_seed(seed)
    provenance = torch.randint(0, 5, (layers, rows), generator=generator)
    return MemoryState(torch.randn(layers, rows, hidden, generator=generator), True, provenance, 4)


def kept_rows(kind: str, layers=2, rows=12, keep=8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "shared":
        return torch.randperm(rows, generator=generator)[:keep].sort().values
    return torch.stack([torch.randperm(rows, generator=generator)[:keep].sort().values for _ in range(layers)])


def assert_same_state(actual: MemoryState, expected: MemoryState) -> None:
    assert torch.equal(actual.memory, expected.memory)
    assert torch.equal(actual.provenance, expected.provenance)
    assert (actual.initialized, actual.injections) == (expected.initialized, expected.injections)


@pytest.mark.parametrize("kind", ["shared", "per_layer", "tile_remainder", "tile_exact", "tile_long"])
@pytest.mark.parametrize("source", ["self", "other"])
def test_in_place_update_equals_the_functional_one_and_keeps_the_storage(kind, source):
    new_rows = {"tile_remainder": 5, "tile_exact": 4, "tile_long": 15}.get(kind, 4)
    delta = torch.randn(2, new_rows, 8)
    kept = kept_rows(kind) if kind in ("shared", "per_layer") else None
    update = MemoryUpdate(delta, 5, kept=kept)
    origin = random_state()
    expected = origin.updated(update)
    target = origin if source == "self" else random_state(seed=3)
    storage, before = target.memory.data_ptr(), origin.clone()
    target.update_(update, source=None if source == "self" else origin)
    assert_same_state(target, expected)
    assert target.memory.data_ptr() == storage
    if source == "other":
        assert_same_state(origin, before)  # the source is only read


def test_functional_update_stays_differentiable():
    state = random_state()
    delta = torch.randn(2, 4, 8, requires_grad=True)
    new = state.updated(MemoryUpdate(delta, 5, kept=kept_rows("per_layer")))
    new.memory.sum().backward()
    assert torch.equal(delta.grad, torch.ones_like(delta))


@torch.no_grad()
@pytest.mark.parametrize("length", [4, 12, 40])  # one chunk, one full chunk, four chunks
def test_inject_in_place_equals_the_functional_updates(length):
    model = tiny_model()
    text = list(range(10, 10 + length))
    expected, generator = model.memory_state.clone(), torch.Generator().manual_seed(0)
    for start in range(0, length, model.config.max_inject_length):
        chunk = torch.tensor([text[start : start + model.config.max_inject_length]])
        delta = model.compute_delta(chunk, memory=expected, output_logits=True)[0][0]
        expected = model.variant.update(expected, delta, expected.injections + 1, generator)
    state = model.memory_state.clone()
    storage = state.memory.data_ptr()
    model.inject(text, memory=state, generator=torch.Generator().manual_seed(0))
    assert_same_state(state, expected)
    assert state.memory.data_ptr() == storage


@torch.no_grad()
def test_injected_returns_new_states_and_leaves_the_given_ones_alone():
    model = tiny_model()
    state = model.memory_state.clone()
    before = state.clone()
    new = model.injected(list(range(10, 50)), memory=state, generator=torch.Generator().manual_seed(0))
    assert_same_state(state, before)
    model.inject(list(range(10, 50)), memory=state, generator=torch.Generator().manual_seed(0))
    assert_same_state(new, state)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["memoryllm-8b", "training-free", "memoryllm-7b"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_the_last_layer_computes_only_the_rows_it_writes(variant, backend):
    options = {"lora_config": None} if variant == "memoryllm-7b" else {}
    model = tiny_model(memory_variant=variant, attn_implementation=backend, **options)
    seen = []
    model.model.layers[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    for attention_mask in (None, mask):
        full, _ = model.compute_delta(ids, attention_mask=attention_mask, output_logits=True)
        assert_close(model.compute_delta(ids, attention_mask=attention_mask), full, tol=1e-5)
    written = 0 if variant == "training-free" else model.config.num_tokens
    assert seen == ([12, 12] if written == 0 else [12, written, 12, written])


@pytest.mark.parametrize("query_length", [1, 5])
@pytest.mark.parametrize("masked", [True, False])
def test_grouped_query_attention_equals_the_expanded_heads(query_length, masked):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from modeling_memoryllm.attention_memoryllm import prefix_sdpa_attention

    module = tiny_model().model.layers[0].self_attn  # 4 query heads on 2 key/value heads
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, query_length, 8, generator=generator)
    key, value = (torch.randn(2, 2, 9, 8, generator=generator) for _ in range(2))
    mask = torch.rand(2, 1, query_length, 9, generator=generator) > 0.3
    mask[..., 0] = True
    mask = mask if masked else None
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=module.scaling)
    actual, _ = prefix_sdpa_attention(module, query, key, value, mask, scaling=module.scaling)
    assert_close(actual, expected, tol=1e-6)


def test_attention_modules_follow_the_models_attention_implementation():
    model = tiny_model()
    attention = model.model.layers[1].self_attn
    assert attention.config._attn_implementation == "memoryllm_sdpa"
    assert attention.config.num_key_value_heads == model.config.num_key_value_heads
    model.config._attn_implementation = "eager"
    assert attention.config._attn_implementation == "eager"


@torch.no_grad()
def test_a_query_longer_than_the_spare_rows_grows_the_leased_prefix_in_place():
    from modeling_memoryllm.cache_memoryllm import SPARE_ROWS, MemoryPrefixCache

    model = tiny_model()
    state = model.memory_state.clone()
    query = torch.randint(3, 90, (1, SPARE_ROWS + 40), generator=torch.Generator().manual_seed(0))
    model(query[:, :4], memory=state)  # computes and caches the prefix (SPARE_ROWS spare rows)
    prefix = state.prefix
    cache = MemoryPrefixCache()
    logits = model(query, memory=state, **{model.cache_kwarg: cache}).logits
    assert state.prefix is prefix and cache.layers[0].keys.data_ptr() == prefix.key_buffers[0].data_ptr()
    assert prefix.key_buffers[0].shape[2] == prefix.length + query.shape[1] + SPARE_ROWS  # grown once, not doubled
    step = model(query[:, -1:], memory=state, **{model.cache_kwarg: cache}).logits  # decoding goes on in place
    del cache
    state.mark_changed()
    expected = model(torch.cat([query, query[:, -1:]], dim=1), memory=state).logits
    assert_close(logits, expected[:, :-1], tol=1e-5)
    assert_close(step[:, -1], expected[:, -1], tol=1e-5)


@torch.no_grad()
def test_a_long_masked_query_by_chunks_equals_one_call():
    from modeling_memoryllm.attention_memoryllm import QUERY_CHUNK, causal_chunks_attention

    generator = torch.Generator().manual_seed(0)
    queries, prefix = 2 * QUERY_CHUNK + 7, 20
    query = torch.randn(2, 4, queries, 8, generator=generator)
    key, value = (torch.randn(2, 2, prefix + queries, 8, generator=generator) for _ in range(2))
    mask = torch.ones(queries, prefix + queries, dtype=torch.bool).tril(prefix).expand(2, 1, -1, -1).clone()
    mask[0, :, :, 3:9] = False  # never-written prefix rows
    mask[1, :, :, prefix : prefix + 5] = False  # left padding
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    assert_close(causal_chunks_attention(query, key, value, mask, None), expected, tol=1e-6)
