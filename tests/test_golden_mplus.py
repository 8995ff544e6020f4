"""Every fixture of golden set E (M+, SEMANTICS-MPLUS.md) through the public API, sdpa and eager (atol = rtol = 1e-4);
the M+ memory state's save/load; batches where every row retrieves for itself."""

import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from modeling_memoryllm import MemoryLLMForCausalLM
from modeling_memoryllm.memory_state_mplus import MPlusMemoryState
from modeling_memoryllm.variant_mplus import retrieval_scores
from tests.conftest import ROOT, assert_close, run_offline_script


SHARED = pathlib.Path(os.environ.get("MEMORYLLM_SHARED", ROOT.parent / "shared"))
GOLDEN_E = SHARED / "golden" / "E" if (SHARED / "golden" / "E").exists() else ROOT / "tests" / "data" / "golden_E"


@pytest.fixture(scope="module")
def fx():
    return load_file(GOLDEN_E / "fixtures.safetensors")


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return MemoryLLMForCausalLM.from_pretrained(GOLDEN_E / "checkpoint", attn_implementation=request.param).eval()


def s0(model, fx) -> MPlusMemoryState:
    """State S0: the checkpoint's memory with the fixture's STM ages."""
    state = model.memory_state.clone()
    state.stm_ages = fx["input.stm_ages0"].double().clone()
    return state


def slot_sources(output) -> list[list[int]]:
    cache = getattr(output, "cache", None) or output.past_key_values
    return [rows[0].tolist() for _, rows in sorted(cache.retrieval.indices.items())]


def past(output, layer):
    cache = getattr(output, "cache", None) or output.past_key_values
    return cache.layers[layer].keys, cache.layers[layer].values


def test_released_config_is_recognised(model, fx):
    config = model.config
    assert config.memory_variant == "mplus" and config.memory_rows == 32 and config.prefix_length == 1 + 16 + 32
    assert_close(model.model.rotary_emb.inv_freq, fx["rope.inv_freq"], tol=0)  # llama3 RoPE
    state = s0(model, fx)
    assert_close(torch.stack(state.ltm), fx["input.ltm0"], tol=0)
    assert_close(torch.stack(state.ltm_keys), fx["input.ltm_keys0"], tol=0)
    assert torch.equal(torch.stack(state.ltm_ages).long(), fx["input.ltm_ages0"])


@torch.no_grad()
def test_injection_deltas(model, fx):
    state = s0(model, fx)
    delta, logits = model.compute_delta(fx["input.ctx_b"], memory=state, output_logits=True)
    assert_close(delta, fx["b.delta_memory"])
    assert_close(logits, fx["b.injection_logits"])
    assert_close(model.compute_delta(fx["input.ctx_c"], memory=state), fx["c.delta_memory"])


@torch.no_grad()
def test_forward_retrieves_per_layer(model, fx):
    state = s0(model, fx)
    output = model(fx["input.query_d"], memory=state)
    assert_close(output.logits, fx["d.logits"])
    assert slot_sources(output) == fx["d.prefix_source"].tolist()
    keys, values = past(output, 0)
    assert_close(keys, fx["d.past_key_layer0"])
    assert_close(values, fx["d.past_value_layer0"])
    assert_close(past(output, -1)[0], fx["d.past_key_lastlayer"])
    assert_close(model(fx["input.query_d"], memory=state).logits, fx["h.logits_uninitialised"])  # = d (spec)


@torch.no_grad()
def test_retrieval_scores(model, fx):
    hidden = model.model.embed_tokens(fx["input.query_d"][0])  # layer 0's input
    layer = model.model.layers[0]
    assert_close(retrieval_scores(layer, hidden, s0(model, fx).ltm_keys[0]), fx["d.retrieval_scores"][0])


@torch.no_grad()
def test_generate_reuses_the_prefill_retrieval(model, fx):
    out = model.generate(
        fx["input.prompt_e"],
        memory=s0(model, fx),
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, fx["e.sequences"])
    assert_close(torch.stack(out.logits, dim=1), fx["e.step_logits"])


@torch.no_grad()
def test_update_buffer_merge_chain(model, fx):
    """f1 (fills the buffer), r (reads LTM and buffer), g (the second update merges)."""
    torch.manual_seed(123)
    state = s0(model, fx)
    model.inject(fx["input.ctx_f1"], memory=state)
    assert_close(state.memory, fx["f1.stm_after"])
    assert torch.equal(state.stm_ages.long(), fx["f1.stm_ages_after"])
    assert_close(state.buffer_rows, fx["f1.cache_rows"])
    assert_close(state.buffer_keys, fx["f1.cache_keys"])
    assert torch.equal(state.buffer_ages.long(), fx["f1.cache_ages"])
    assert torch.equal(torch.stack(state.ltm_ages).long(), fx["f1.ltm_ages_after"])
    assert state.update_step == 8
    output = model(fx["input.query_d"], memory=state)
    assert_close(output.logits, fx["r.logits"])
    assert slot_sources(output) == fx["r.prefix_source"].tolist()
    model.inject(fx["input.ctx_f2"], memory=state)
    assert_close(state.memory, fx["g.stm_after"])
    for layer in range(3):
        assert_close(state.ltm[layer], fx[f"g.ltm_after.{layer}"])
        assert_close(state.ltm_keys[layer], fx[f"g.ltm_keys_after.{layer}"])
        assert torch.equal(state.ltm_ages[layer].long(), fx[f"g.ltm_ages_after.{layer}"])
        assert_close(state.ltm_rf[layer], fx[f"g.ltm_rf_after.{layer}"], tol=0)
    assert state.update_step == 0 and state.buffer_rows.shape[1] == 0
    output = model(fx["input.query_d"], memory=state)
    assert_close(output.logits, fx["g.logits"])
    assert slot_sources(output) == fx["g.prefix_source"].tolist()


@torch.no_grad()
def test_merge_keeps_everything_when_too_few_would_survive(model, fx):
    state = s0(model, fx)
    state.ltm_rf = [torch.ones_like(rf) for rf in state.ltm_rf]
    torch.manual_seed(123)
    model.inject(fx["input.ctx_f1"], memory=state)
    model.inject(fx["input.ctx_f2"], memory=state)
    assert_close(torch.stack(state.ltm_rf), fx["m2.ltm_rf_after"], tol=0)
    assert torch.equal(torch.stack(state.ltm_ages).long(), fx["m2.ltm_ages_after"])


@torch.no_grad()
def test_small_ltm_is_tiled_and_ordered_by_age(model, fx):
    state = s0(model, fx)
    for part in (state.ltm, state.ltm_keys, state.ltm_ages, state.ltm_rf):
        part[:] = [rows[:5] for rows in part]
    state.mark_changed()
    output = model(fx["input.query_d"], memory=state)
    assert_close(output.logits, fx["t.logits"])
    assert slot_sources(output) == fx["t.prefix_source"].tolist()


@torch.no_grad()
def test_every_batch_row_retrieves_for_itself(model, fx):
    """Two rows with their own memories (one after the f1 update) give what each gives alone."""
    first, second = s0(model, fx), s0(model, fx)
    model.inject(fx["input.ctx_f1"], memory=second, generator=torch.Generator().manual_seed(1))
    ids = torch.cat([fx["input.query_d"], fx["input.query_d"].flip(1)])
    batched = model(ids, memory=[first, second]).logits
    assert_close(batched[0], model(ids[:1], memory=first).logits[0])
    assert_close(batched[1], model(ids[1:], memory=second).logits[0])


def test_state_save_load_roundtrip(model, fx, tmp_path):
    state = s0(model, fx)
    with torch.no_grad():
        model.inject(fx["input.ctx_f1"], memory=state, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "mplus.safetensors"
    state.save(path, config=model.config)
    loaded = model.load_memory_state(path)
    assert isinstance(loaded, MPlusMemoryState) and loaded.update_step == state.update_step
    for mine, theirs in zip(state.tensors().values(), loaded.tensors().values()):
        assert torch.equal(mine, theirs)
    with torch.no_grad():
        assert torch.equal(
            model(fx["input.query_d"], memory=loaded).logits, model(fx["input.query_d"], memory=state).logits
        )
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # one flipped bit in the data
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        model.load_memory_state(path)


REMOTE_CHECK = r"""
import sys
sys.modules["modeling_memoryllm"] = None  # the package itself must not be importable
import json, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
folder, fixtures_path = sys.argv[1], sys.argv[2]
fx = load_file(fixtures_path)
def err(a, b):
    return 1e9 if a.shape != b.shape else float(((a.float() - b.float()).abs() / (1e-4 + 1e-4 * b.float().abs())).max())
def sources(out):
    cache = getattr(out, "cache", None) or out.past_key_values
    return [rows[0].tolist() for _, rows in sorted(cache.retrieval.indices.items())]
results = {}
with torch.no_grad():
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation=attn).eval()
        r = {"module": type(model).__module__, "variant": model.config.memory_variant}
        def s0():
            state = model.memory_state.clone()
            state.stm_ages = fx["input.stm_ages0"].double().clone()
            return state
        delta, logits = model.compute_delta(fx["input.ctx_b"], memory=s0(), output_logits=True)
        r["b.delta"], r["b.logits"] = err(delta, fx["b.delta_memory"]), err(logits, fx["b.injection_logits"])
        r["c"] = err(model.compute_delta(fx["input.ctx_c"], memory=s0()), fx["c.delta_memory"])
        out = model(fx["input.query_d"], memory=s0())
        cache = getattr(out, "cache", None) or out.past_key_values
        r["d.logits"], r["h"] = err(out.logits, fx["d.logits"]), err(out.logits, fx["h.logits_uninitialised"])
        r["d.key0"] = err(cache.layers[0].keys, fx["d.past_key_layer0"])
        r["d.value0"] = err(cache.layers[0].values, fx["d.past_value_layer0"])
        r["d.key_last"] = err(cache.layers[-1].keys, fx["d.past_key_lastlayer"])
        r["d.sources"] = float(sources(out) != fx["d.prefix_source"].tolist())
        gen = model.generate(fx["input.prompt_e"], memory=s0(), max_new_tokens=8, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        r["e.sequences"] = float(not torch.equal(gen.sequences, fx["e.sequences"]))
        r["e.logits"] = err(torch.stack(gen.logits, dim=1), fx["e.step_logits"])
        torch.manual_seed(123)
        state = s0()
        model.inject(fx["input.ctx_f1"], memory=state)
        r["f1.stm"], r["f1.buffer"] = err(state.memory, fx["f1.stm_after"]), err(state.buffer_rows, fx["f1.cache_rows"])
        r["f1.keys"] = err(state.buffer_keys, fx["f1.cache_keys"])
        r["f1.ages"] = err(state.buffer_ages, fx["f1.cache_ages"])
        out = model(fx["input.query_d"], memory=state)
        r["r.logits"] = err(out.logits, fx["r.logits"])
        r["r.sources"] = float(sources(out) != fx["r.prefix_source"].tolist())
        model.inject(fx["input.ctx_f2"], memory=state)
        r["g.stm"] = err(state.memory, fx["g.stm_after"])
        for layer in range(3):
            r[f"g.ltm.{layer}"] = err(state.ltm[layer], fx[f"g.ltm_after.{layer}"])
            r[f"g.rf.{layer}"] = err(state.ltm_rf[layer], fx[f"g.ltm_rf_after.{layer}"])
        r["g.logits"] = err(model(fx["input.query_d"], memory=state).logits, fx["g.logits"])
        state = s0()
        for part in (state.ltm, state.ltm_keys, state.ltm_ages, state.ltm_rf):
            part[:] = [rows[:5] for rows in part]
        state.mark_changed()
        r["t.logits"] = err(model(fx["input.query_d"], memory=state).logits, fx["t.logits"])
        state = s0()
        state.ltm_rf = [torch.ones_like(rf) for rf in state.ltm_rf]
        torch.manual_seed(123)
        model.inject(fx["input.ctx_f1"], memory=state)
        model.inject(fx["input.ctx_f2"], memory=state)
        r["m2.rf"] = err(torch.stack(state.ltm_rf), fx["m2.ltm_rf_after"])
        results[attn] = r
print(json.dumps(results))
"""


def test_trust_remote_code_reproduces_every_fixture_in_a_fresh_process(tmp_path):
    folder = tmp_path / "saved"
    MemoryLLMForCausalLM.from_pretrained(GOLDEN_E / "checkpoint").save_pretrained(folder)
    results = run_offline_script(REMOTE_CHECK, str(folder), str(GOLDEN_E / "fixtures.safetensors"), cwd=tmp_path)
    assert sorted(results) == ["eager", "sdpa"]
    for backend, result in results.items():
        assert result.pop("module").startswith("transformers_modules") and result.pop("variant") == "mplus"
        failing = {name: value for name, value in result.items() if not value < 1}  # in units of the 1e-4 tolerance
        assert not failing and len(result) == 27, (backend, failing)
