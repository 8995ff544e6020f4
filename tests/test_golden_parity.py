"""Every fixture of golden checkpoint A, reproduced through the public API (atol = rtol = 1e-4)."""

import pytest
import torch

from modeling_memoryllm import MemoryState
from tests.conftest import assert_close, load_golden


BACKENDS = ["sdpa", "eager"]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return load_golden(request.param)


def initialised(fixtures) -> MemoryState:
    return MemoryState(fixtures["input.memory_M0"].clone(), initialized=True)


def past_keys(output, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    cache = getattr(output, "cache", None) or output.past_key_values
    return cache.layers[layer].keys, cache.layers[layer].values


@torch.no_grad()
def test_checkpoint_memory_is_M0(model, fixtures):
    state = model.memory_state
    assert state.initialized
    assert_close(state.memory, fixtures["input.memory_M0"], tol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", ["a", "a2"])
def test_first_injection_into_uninitialised_memory(model, fixtures, name):
    state = model.new_memory_state()
    ids = fixtures[f"input.ctx_{name}"]
    assert_close(model.compute_delta(ids, memory=state), fixtures[f"{name}.delta_memory"])
    model.inject(ids, memory=state)
    assert state.initialized and state.injections == 1
    assert_close(state.memory, fixtures[f"{name}.memory_after"])


@torch.no_grad()
def test_uninitialised_forward(model, fixtures):
    logits = model(fixtures["input.query_d"], memory=model.new_memory_state()).logits
    assert_close(logits, fixtures["h.logits_uninitialised"])


@torch.no_grad()
def test_injection_delta_and_logits(model, fixtures):
    state = initialised(fixtures)
    delta, logits = model.compute_delta(fixtures["input.ctx_b"], memory=state, output_logits=True)
    assert_close(delta, fixtures["b.delta_memory"])
    assert_close(logits, fixtures["b.injection_logits"])
    assert_close(state.memory, fixtures["input.memory_M0"], tol=0)  # compute_delta changes nothing


@torch.no_grad()
def test_short_context_delta(model, fixtures):
    delta = model.compute_delta(fixtures["input.ctx_c"], memory=initialised(fixtures))
    assert_close(delta, fixtures["c.delta_memory"])


@torch.no_grad()
def test_forward_logits_and_prefix_cache(model, fixtures):
    output = model(fixtures["input.query_d"], memory=initialised(fixtures))
    assert_close(output.logits, fixtures["d.logits"])
    keys, values = past_keys(output, 0)
    assert_close(keys, fixtures["d.past_key_layer0"])
    assert_close(values, fixtures["d.past_value_layer0"])
    assert_close(past_keys(output, -1)[0], fixtures["d.past_key_lastlayer"])


@torch.no_grad()
def test_greedy_generation(model, fixtures):
    output = model.generate(
        fixtures["input.prompt_e"],
        memory=initialised(fixtures),
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(output.sequences, fixtures["e.sequences"])
    assert_close(torch.stack(output.logits, dim=1), fixtures["e.step_logits"])


@torch.no_grad()
def test_manual_decoding_with_cache_matches_generate(model, fixtures):
    state = initialised(fixtures)
    ids = fixtures["input.prompt_e"]
    output = model(ids, memory=state)
    cache = getattr(output, "cache", None) or output.past_key_values
    tokens = []
    for _ in range(8):
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        output = model(token, memory=state, past_key_values=cache)
    assert torch.equal(torch.cat([ids, *tokens], dim=1), fixtures["e.sequences"])


def test_drop_rule_kept_rows_then_delta(fixtures, golden_model):
    torch.manual_seed(123)
    M0 = fixtures["input.memory_M0"]
    provenance = torch.zeros(M0.shape[:2], dtype=torch.long)
    state = MemoryState(M0, True, provenance)
    update = golden_model.variant.update(state, fixtures["b.delta_memory"][0], 1)
    kept = fixtures["f.kept_indices"]  # [L, keep]
    expected = torch.cat([torch.stack([M0[l, kept[l]] for l in range(M0.shape[0])]), fixtures["b.delta_memory"][0]], 1)
    assert_close(update.memory, expected, tol=0)
    assert_close(update.memory, fixtures["f.memory_after"], tol=0)
    assert (update.provenance[:, -golden_model.config.num_tokens :] == 1).all()
    assert (update.provenance[:, : kept.shape[1]] == 0).all()


@torch.no_grad()
def test_inject_then_read_with_models_own_memory(fixtures):
    model = load_golden()
    torch.manual_seed(123)
    model.inject(fixtures["input.ctx_b"])
    assert_close(model.memory, fixtures["f.memory_after"])
    assert_close(model(fixtures["input.query_d"]).logits, fixtures["g.logits"])


@torch.no_grad()
def test_generator_makes_drop_reproducible(golden_model, fixtures):
    states = [initialised(fixtures) for _ in range(3)]
    for state, seed in zip(states, [7, 7, 8]):
        golden_model.inject(fixtures["input.ctx_b"], memory=state, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(states[0].memory, states[1].memory)
    assert not torch.equal(states[0].memory, states[2].memory)
