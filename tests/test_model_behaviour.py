"""Behaviour beyond the released code: padding, backends, caching, batched memories, states, validation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_memoryllm import MemoryLLMConfig, MemoryLLMForCausalLM, MemoryState
from tests.conftest import assert_close
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_left_padded_batch_equals_unpadded_rows(backend):
    model = tiny_model(attn_implementation=backend)
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    batch = ids([0, 0, 0, *short], long)
    mask = ids([0, 0, 0, 1, 1, 1], [1] * 6)
    logits = model(batch, attention_mask=mask).logits
    assert_close(logits[0, 3:], model(ids(short)).logits[0])
    assert_close(logits[1], model(ids(long)).logits[0])
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[0, 3:], model.generate(ids(short), max_new_tokens=5, do_sample=False)[0])
    assert torch.equal(generated[1], model.generate(ids(long), max_new_tokens=5, do_sample=False)[0])


@torch.no_grad()
def test_backends_agree(model):
    eager = tiny_model(attn_implementation="eager")
    query = ids([3, 4, 5, 6])
    assert_close(model(query).logits, eager(query).logits)


@torch.no_grad()
def test_prefix_is_computed_once_per_memory_version_and_not_copied(model):
    state = model.memory_state.clone()
    model(ids([3, 4]), memory=state)
    prefix = state.prefix
    assert prefix is not None
    output = model(ids([5, 6, 7]), memory=state)
    assert state.prefix is prefix  # reused, not recomputed
    cache = getattr(output, "cache", None) or output.past_key_values
    assert cache.layers[0].keys.data_ptr() == prefix.key_buffers[0].data_ptr()  # leased in place, no copy
    cached_logits = output.logits
    state.mark_changed()  # force recomputation
    assert_close(cached_logits, model(ids([5, 6, 7]), memory=state).logits, tol=1e-6)
    model.inject(list(range(10, 20)), memory=state)
    assert state.prefix is None  # a new memory version drops the cached prefix
    assert not torch.allclose(model(ids([5, 6, 7]), memory=state).logits, cached_logits)


@torch.no_grad()
def test_concurrent_cache_does_not_share_the_leased_buffer(model):
    state = model.memory_state.clone()
    held = model(ids([3, 4, 5]), memory=state)  # holds the lease while alive
    held_cache = getattr(held, "cache", None) or held.past_key_values
    snapshot = held_cache.layers[0].keys.clone()
    other = model(ids([9, 9, 9, 9]), memory=state)
    other_cache = getattr(other, "cache", None) or other.past_key_values
    assert other_cache.layers[0].keys.data_ptr() != held_cache.layers[0].keys.data_ptr()
    assert torch.equal(held_cache.layers[0].keys, snapshot)


@torch.no_grad()
def test_batched_injection_equals_one_by_one(model):
    texts = [list(range(5, 19)), list(range(30, 37)), list(range(40, 42)), list(range(50, 60))]
    singles = [model.memory_state.clone() for _ in texts]
    for state, text in zip(singles, texts):
        model.inject(text, memory=state, generator=torch.Generator().manual_seed(1))
    batched = [model.memory_state.clone() for _ in texts]
    generators = [torch.Generator().manual_seed(1) for _ in texts]
    model.inject(texts, memory=batched, generator=generators)
    for single, state in zip(singles, batched):
        assert state.injections == single.injections
        assert_close(state.memory, single.memory)


@torch.no_grad()
def test_generate_with_one_memory_per_row(model):
    states = [model.memory_state.clone(), model.new_memory_state()]
    model.inject(list(range(20, 40)), memory=states[1])
    prompt = ids([3, 4, 5])
    together = model.generate(prompt.repeat(2, 1), memory=states, max_new_tokens=4, do_sample=False)
    for row, state in enumerate(states):
        alone = model.generate(prompt, memory=state, max_new_tokens=4, do_sample=False)
        assert torch.equal(together[row], alone[0])


@torch.no_grad()
def test_long_text_is_chunked_in_order(model):
    text = list(range(3, 3 + 30))  # 30 tokens, max_inject_length 12: chunks of 12, 12, 6
    chunked = model.inject(text, memory=model.memory_state.clone(), generator=torch.Generator().manual_seed(2))
    manual = model.memory_state.clone()
    generator = torch.Generator().manual_seed(2)
    for start in (0, 12, 24):
        model.inject(text[start : start + 12], memory=manual, generator=generator)
    assert chunked.injections == 3
    assert_close(chunked.memory, manual.memory)
    assert set(chunked.provenance_summary()) <= {0, 1, 2, 3}


@pytest.mark.parametrize(
    "bad",
    ["", "   ", [], [[]], [1, 2, 500], [-1, 3], torch.tensor([1.0, 2.0]), 3.5, None, {"a": 1}, [True, False]],
)
def test_bad_inputs_raise_and_leave_memory_untouched(model, bad):
    state = model.memory_state.clone()
    before = state.memory.clone()
    with pytest.raises(ValueError):
        model.inject(bad, memory=state)
    assert torch.equal(state.memory, before) and state.injections == 0


def test_short_text_warns(model, caplog):
    with caplog.at_level("WARNING"):
        model.inject([5, 6, 7], memory=model.memory_state.clone())
    assert "fewer than 16 tokens" in caplog.text


def test_short_text_does_not_warn_in_the_training_free_modes(caplog):
    for variant in ("training-free", "training-free-ranked"):
        model = tiny_model(0, memory_variant=variant, num_tokens=4, num_blocks=3, max_inject_length=4)
        with caplog.at_level("WARNING"):
            model.inject([5, 6, 7], memory=model.new_memory_state(), show_progress=False)
        assert "fewer than" not in caplog.text, variant


@torch.no_grad()
def test_plain_llama_equivalence():
    config = MemoryLLMConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_tokens=4, num_blocks=2, lora_config=None,
    )  # fmt: skip
    memoryllm = MemoryLLMForCausalLM(config).eval()
    llama = LlamaForCausalLM(LlamaConfig(**config.to_diff_dict())).eval()
    llama.load_state_dict(memoryllm.state_dict(), strict=False)
    query = ids([4, 8, 15, 16, 23, 42])
    assert not memoryllm.memory_state.initialized
    assert_close(memoryllm(query).logits, llama(query).logits, tol=1e-6)
    assert torch.equal(
        memoryllm.generate(query, max_new_tokens=5, do_sample=False),
        llama.generate(query, max_new_tokens=5, do_sample=False),
    )


def test_state_save_load_roundtrip_and_validation(model, tmp_path):
    state = model.memory_state.clone()
    model.inject(list(range(10, 30)), memory=state)
    path = tmp_path / "memory.safetensors"
    state.save(path, config=model.config)
    loaded = model.load_memory_state(path)
    assert torch.equal(loaded.memory, state.memory) and torch.equal(loaded.provenance, state.provenance)
    assert loaded.injections == state.injections and loaded.initialized
    assert [p.name for p in tmp_path.iterdir()] == ["memory.safetensors"]  # no temp file left
    other = tiny_model(num_blocks=4)
    with pytest.raises(ValueError, match="different model"):
        other.load_memory_state(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        model.load_memory_state(path)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype):
    model = tiny_model().to(dtype)
    state = MemoryState(model.memory_state.memory.float().clone(), True)  # a float32 state read by a half model
    model.inject(list(range(10, 30)), memory=state)
    output = model.generate(ids([3, 4, 5]), memory=state, max_new_tokens=3, do_sample=False)
    assert output.shape == (1, 6)
    assert torch.isfinite(model(ids([3, 4, 5]), memory=state).logits).all()


@torch.no_grad()
def test_fresh_adapters_change_nothing():
    from tests.tiny import tiny_config

    with_lora = MemoryLLMForCausalLM(tiny_config()).eval()
    for name, param in with_lora.named_parameters():
        if ".lora_B." in name:
            assert param.abs().max() == 0, name
        if ".lora_A." in name:
            assert param.abs().max() > 0, name
    assert with_lora.new_memory_positional_emb.abs().max() == 0
    assert not with_lora.memory_state.initialized


@torch.no_grad()
def test_training_free_rule_fills_empty_rows_first_and_never_reads_them():
    model = tiny_model(memory_write_rule="input")  # N=4, M=12
    state = model.new_memory_state()
    text = list(range(10, 16))  # 6 tokens: the rule writes the inputs of the last 4
    delta = model.compute_delta(torch.tensor([text]), memory=state)
    model.inject(text, memory=state)
    assert state.provenance_summary() == {-1: 2 * 8, 1: 2 * 4}  # 2 layers: 8 empty rows, 4 written, per layer
    assert_close(state.memory[:, -4:], delta[0])
    query = ids([3, 4, 5])
    logits = model(query, memory=state).logits
    junk = state.clone()
    junk.memory[:, :8] = torch.randn_like(junk.memory[:, :8]) * 10  # never-written rows: never read
    junk.mark_changed()
    assert_close(model(query, memory=junk).logits, logits)
    for start in (20, 30):  # fills the two remaining blocks of empty rows
        model.inject(list(range(start, start + 4)), memory=state)
    assert -1 not in state.provenance_summary()
    assert (state.provenance[:, :4] == 1).all() and (state.provenance[:, 8:] == 3).all()
    model.inject(list(range(40, 44)), memory=state, generator=torch.Generator().manual_seed(0))
    assert sorted(state.provenance_summary().values()) != [8, 8, 8]  # now old rows are evicted at random
    assert (state.provenance[:, -4:] == 4).all()


def test_a_saved_and_reloaded_uninitialised_model_has_only_empty_rows(tmp_path):
    model = tiny_model(memory_write_rule="input")
    model.memory_state.reset()
    model.save_pretrained(tmp_path)
    reloaded = MemoryLLMForCausalLM.from_pretrained(tmp_path)
    assert reloaded.memory_state.provenance_summary() == {-1: 2 * 12}
    reloaded.inject(list(range(10, 20)))
    assert reloaded.memory_state.provenance_summary() == {-1: 2 * 8, 1: 2 * 4}
