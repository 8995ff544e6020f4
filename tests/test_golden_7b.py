"""Golden set C (the paper's MemoryLLM-7B code on a tiny checkpoint in the released layout): every fixture through the
public API under sdpa and eager attention, and from a `trust_remote_code` load in a fresh process; the released config
keys; the RoPE checks the original passed; and the calls where the original crashes (text-only masks, `generate`
without a mask or without bos), checked against plain full forwards. atol = rtol = 1e-4."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from modeling_memoryllm import MemoryLLMConfig, MemoryLLMForCausalLM, MemoryState
from tests.conftest import assert_close, golden_path, run_offline_script


pytestmark = pytest.mark.usefixtures("one_torch_thread")
GOLDEN_C = golden_path("C")
CHECKPOINT = GOLDEN_C / "checkpoint"
BACKENDS = ["sdpa", "eager"]
# Keys of the released config that transformers 5 stores differently (`rope_parameters`, `dtype`) or rewrites.
REWRITTEN = {"architectures", "model_type", "transformers_version", "torch_dtype", "rope_scaling", "rope_theta"}


def load_c(attn_implementation: str = "sdpa", folder=CHECKPOINT, **kwargs) -> MemoryLLMForCausalLM:
    model = MemoryLLMForCausalLM.from_pretrained(
        folder, attn_implementation=attn_implementation, dtype=torch.float32, **kwargs
    )
    return model.eval()


@pytest.fixture(scope="module")
def fx() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN_C / "fixtures.safetensors")


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((GOLDEN_C / "fixtures.json").read_text())


@pytest.fixture(scope="module")
def raw_config() -> dict:
    return json.loads((CHECKPOINT / "config.json").read_text())


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return load_c(request.param)


def initialised(fx) -> MemoryState:
    return MemoryState(fx["input.memory_M0"].clone(), initialized=True)


def past(output, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    cache = getattr(output, "cache", None) or output.past_key_values
    return cache.layers[layer].keys, cache.layers[layer].values


def released_copy(tmp_path, **changes):
    """The checkpoint folder with `changes` applied to its released `config.json`."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **changes}))
    return folder


@torch.no_grad()
def full_forward_greedy(model, prompt: torch.Tensor, state: MemoryState, steps: int):
    """Reference decode: a plain loop of full forwards without a cache; returns (sequence, logits of each step)."""
    seq, logits = prompt, []
    for _ in range(steps):
        last = model(seq, memory=state, use_cache=False).logits[:, -1]
        logits.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
        if int(seq[0, -1]) == model.config.eos_token_id:
            break
    return seq, torch.stack(logits, dim=1)


# ----------------------------------------------------------------------------------------- the checkpoint itself


def test_released_config_is_the_7b_variant(model, raw_config):
    config = model.config
    assert "memory_variant" not in raw_config
    assert config.memory_variant == "memoryllm-7b"
    assert config.adapter_names == () and not any("lora" in n for n, _ in model.named_parameters())
    assert not model.variant.drops_per_layer(config)
    span = (raw_config["num_blocks"] + 1) * raw_config["num_tokens"]
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == pytest.approx(span / raw_config["max_position_embeddings"])
    assert config.rope_parameters["rope_theta"] == 10000.0


def test_checkpoint_memory_is_M0(model, fx):
    assert model.memory_state.initialized
    assert_close(model.memory_state.memory, fx["input.memory_M0"], tol=0)


# ------------------------------------------------------------------------------------------------- the fixtures


@torch.no_grad()
@pytest.mark.parametrize("name", ["a", "a2"])
def test_first_injection_into_uninitialised_memory(model, fx, name):
    state = model.new_memory_state()
    ids = fx[f"input.ctx_{name}"]
    assert_close(model.compute_delta(ids, memory=state), fx[f"{name}.delta_memory"])
    assert not state.initialized  # compute_delta changes nothing
    model.inject(ids, memory=state)
    assert state.initialized and state.injections == 1
    assert_close(state.memory, fx[f"{name}.memory_after"])


@torch.no_grad()
def test_uninitialised_forward(model, fx):
    assert_close(model(fx["input.query_d"], memory=model.new_memory_state()).logits, fx["h.logits_uninitialised"])


@torch.no_grad()
def test_injection_delta_and_logits(model, fx):
    state = initialised(fx)
    delta, logits = model.compute_delta(fx["input.ctx_b"], memory=state, output_logits=True)
    assert_close(delta, fx["b.delta_memory"])
    assert_close(logits, fx["b.injection_logits"])
    assert_close(state.memory, fx["input.memory_M0"], tol=0)


@torch.no_grad()
def test_short_context_delta(model, fx):
    assert_close(model.compute_delta(fx["input.ctx_c"], memory=initialised(fx)), fx["c.delta_memory"])


@torch.no_grad()
def test_forward_logits_and_prefix_cache(model, fx):
    output = model(fx["input.query_d"], memory=initialised(fx))
    assert_close(output.logits, fx["d.logits"])
    keys, values = past(output, 0)
    assert keys.shape == values.shape == fx["d.past_key_layer0"].shape == (1, 4, 40, 16)
    assert_close(keys, fx["d.past_key_layer0"])
    assert_close(values, fx["d.past_value_layer0"])
    assert_close(past(output, -1)[0], fx["d.past_key_lastlayer"])


@torch.no_grad()
def test_greedy_generation_with_step_logits(model, fx):
    output = model.generate(
        fx["input.prompt_e"],
        memory=initialised(fx),
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(output.sequences, fx["e.sequences"])
    assert_close(torch.stack(output.logits, dim=1), fx["e.step_logits"])


@torch.no_grad()
def test_manual_decoding_with_cache(model, fx):
    state, ids = initialised(fx), fx["input.prompt_e"]
    output = model(ids, memory=state)
    cache = getattr(output, "cache", None) or output.past_key_values
    tokens, logits = [], []
    for _ in range(8):
        logits.append(output.logits[:, -1])
        tokens.append(output.logits[:, -1].argmax(-1, keepdim=True))
        output = model(tokens[-1], memory=state, past_key_values=cache)
    assert torch.equal(torch.cat([ids, *tokens], dim=1), fx["e.sequences"])
    assert_close(torch.stack(logits, dim=1), fx["e.step_logits"])


def test_update_rule_shared_drop_then_delta(model, fx):
    """f without torch's RNG: the kept rows are M0's rows at one ascending index set, the same in every layer."""
    M0, after, delta = fx["input.memory_M0"], fx["f.memory_after"], fx["b.delta_memory"][0]
    config = model.config
    keep = config.memory_rows - int(config.memory_rows * (1 / config.num_blocks))
    match = (after[:, :keep, None, :] == M0[:, None, :, :]).all(-1)  # [L, keep, M]
    assert bool((match.sum(-1) == 1).all())
    idx = match.float().argmax(-1)  # [L, keep]
    assert bool((idx == idx[:1]).all()) and bool((idx[0, 1:] > idx[0, :-1]).all())
    assert torch.equal(idx[0], fx["f.kept_indices"])
    assert_close(after[:, keep:], delta, tol=0)
    # the package's update, under the same seed, draws the same rows
    torch.manual_seed(123)
    provenance = torch.zeros(M0.shape[:2], dtype=torch.long)
    update = model.variant.update(MemoryState(M0, True, provenance), delta, 1)
    expected = torch.cat([M0[:, fx["f.kept_indices"]], delta], dim=1)
    assert_close(update.memory, expected, tol=0)
    assert_close(update.memory, after, tol=0)
    assert bool((update.provenance[:, keep:] == 1).all()) and bool((update.provenance[:, :keep] == 0).all())


@torch.no_grad()
def test_inject_then_read_with_models_own_memory(fx):
    model = load_c()
    torch.manual_seed(123)
    model.inject(fx["input.ctx_b"])
    assert_close(model.memory, fx["f.memory_after"])
    assert_close(model(fx["input.query_d"]).logits, fx["g.logits"])


@torch.no_grad()
def test_inject_then_read_with_a_state(model, fx):
    state = initialised(fx)
    torch.manual_seed(123)
    model.inject(fx["input.ctx_b"], memory=state)
    assert_close(state.memory, fx["f.memory_after"])
    assert_close(model(fx["input.query_d"], memory=state).logits, fx["g.logits"])


# ------------------------------------------------------------------------------- trust_remote_code, fresh process

REMOTE_CHECK = r"""
import sys
sys.modules["modeling_memoryllm"] = None  # the package itself must not be importable
import json, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
folder, fixtures_path = sys.argv[1], sys.argv[2]
fx = load_file(fixtures_path)
def err(a, b):
    if a.shape != b.shape:
        return 1e9
    return float(((a.float() - b.float()).abs() / (1e-4 + 1e-4 * b.float().abs())).max())
results = {}
with torch.no_grad():
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation=attn).eval()
        M0, r = fx["input.memory_M0"], {}
        r["module"] = type(model).__module__
        r["variant"] = model.config.memory_variant
        init = lambda: model.memory_state.__class__(M0.clone(), initialized=True)
        for name in ("a", "a2"):
            state, ids = model.new_memory_state(), fx["input.ctx_" + name]
            r[name + ".delta"] = err(model.compute_delta(ids, memory=state), fx[name + ".delta_memory"])
            model.inject(ids, memory=state)
            r[name + ".memory"] = err(state.memory, fx[name + ".memory_after"])
        r["h"] = err(model(fx["input.query_d"], memory=model.new_memory_state()).logits, fx["h.logits_uninitialised"])
        delta, logits = model.compute_delta(fx["input.ctx_b"], memory=init(), output_logits=True)
        r["b.delta"], r["b.logits"] = err(delta, fx["b.delta_memory"]), err(logits, fx["b.injection_logits"])
        r["c"] = err(model.compute_delta(fx["input.ctx_c"], memory=init()), fx["c.delta_memory"])
        out = model(fx["input.query_d"], memory=init())
        cache = getattr(out, "cache", None) or out.past_key_values
        r["d.logits"] = err(out.logits, fx["d.logits"])
        r["d.key0"] = err(cache.layers[0].keys, fx["d.past_key_layer0"])
        r["d.value0"] = err(cache.layers[0].values, fx["d.past_value_layer0"])
        r["d.key_last"] = err(cache.layers[-1].keys, fx["d.past_key_lastlayer"])
        gen = model.generate(fx["input.prompt_e"], memory=init(), max_new_tokens=8, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        r["e.sequences_equal"] = bool(torch.equal(gen.sequences, fx["e.sequences"]))
        r["e.logits"] = err(torch.stack(gen.logits, dim=1), fx["e.step_logits"])
        torch.manual_seed(123)
        model.inject(fx["input.ctx_b"])  # the model's own memory: M0 from the checkpoint
        r["f.memory"] = err(model.memory, fx["f.memory_after"])
        r["g"] = err(model(fx["input.query_d"]).logits, fx["g.logits"])
        results[attn] = r
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def saved_c(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved_golden_c")
    load_c().save_pretrained(folder)
    return folder


def test_fresh_process_trust_remote_code_reproduces_every_fixture(saved_c, tmp_path):
    results = run_offline_script(REMOTE_CHECK, str(saved_c), str(GOLDEN_C / "fixtures.safetensors"), cwd=tmp_path)
    assert sorted(results) == sorted(BACKENDS)
    for backend, result in results.items():
        assert result.pop("module").startswith("transformers_modules"), backend
        assert result.pop("variant") == "memoryllm-7b", backend
        assert result.pop("e.sequences_equal"), backend
        # each number: max |actual - expected| in units of (atol + rtol |expected|) at 1e-4; below 1 passes
        failing = {name: value for name, value in result.items() if not value < 1}
        assert not failing, (backend, failing)
        assert len(result) == 15


# ------------------------------------------------------------------------------------------------ the config


def test_released_config_keys_load_and_survive_save_and_reload(raw_config, saved_c):
    """Every released key, those the code never reads included, loads as given and is written back unchanged."""
    config = MemoryLLMConfig.from_pretrained(CHECKPOINT)
    kept = {key: value for key, value in raw_config.items() if key not in REWRITTEN}
    assert {"shrink_to_one_embedding", "new_delta_memory_length", "put_memory_on_cpu"} <= set(kept)
    for key, value in kept.items():
        assert getattr(config, key) == value, key
    assert config.dtype == torch.float32
    saved = json.loads((saved_c / "config.json").read_text())
    for key, value in kept.items():
        assert saved[key] == value, key
    assert saved["memory_variant"] == "memoryllm-7b"
    reloaded = MemoryLLMConfig.from_pretrained(saved_c)
    for key, value in kept.items():
        assert getattr(reloaded, key) == value, key
    assert reloaded.memory_variant == config.memory_variant
    assert reloaded.rope_parameters == config.rope_parameters  # the interpolation is not applied twice


@torch.no_grad()
def test_saved_copy_gives_the_same_logits(saved_c, fx):
    for backend in BACKENDS:
        assert_close(load_c(backend, saved_c)(fx["input.query_d"]).logits, fx["d.logits"])


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_theta_is_not_read(backend, fx, meta, tmp_path):
    assert meta["checks_passed"]["rope_theta is not read: reloaded with rope_theta=5e5, d.logits max |diff|"] == 0.0
    model = load_c(backend, released_copy(tmp_path, rope_theta=5e5))
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    assert_close(model(fx["input.query_d"]).logits, fx["d.logits"])


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_interpolation_is_linear_rope_scaling_and_matters(backend, fx, meta, raw_config, tmp_path):
    span = (raw_config["num_blocks"] + 1) * raw_config["num_tokens"]
    factor = span / raw_config["max_position_embeddings"]
    linear = released_copy(
        tmp_path / "linear", interpolate_position_ids=False, rope_scaling={"type": "linear", "factor": factor}
    )
    assert_close(load_c(backend, linear)(fx["input.query_d"]).logits, fx["d.logits"])
    off = load_c(backend, released_copy(tmp_path / "off", interpolate_position_ids=False))
    assert off.config.memory_variant == "memoryllm-7b"
    moved = float((off(fx["input.query_d"]).logits - fx["d.logits"]).abs().max())
    recorded = meta["checks_passed"][
        "interpolation matters: reloaded with interpolate_position_ids=False, d.logits max |diff|"
    ]
    assert moved == pytest.approx(recorded, abs=1e-3)  # the original's own number, reproduced


# ------------------------------------------------------------------------------ where the original crashes


@torch.no_grad()
def test_text_only_masks_equal_no_mask(model, fx):
    """The original wants masks of `ones(M + T)` (`ones(N + T)` for injection) and crashes on the defaults at
    init = 0; here a mask covers the text only, at init = 1 and init = 0."""
    d, b, a = fx["input.query_d"], fx["input.ctx_b"], fx["input.ctx_a"]
    assert_close(model(d, attention_mask=torch.ones_like(d), memory=initialised(fx)).logits, fx["d.logits"])
    uninitialised = model.new_memory_state()
    assert_close(model(d, attention_mask=torch.ones_like(d), memory=uninitialised).logits, fx["h.logits_uninitialised"])
    assert_close(
        model.compute_delta(b, attention_mask=torch.ones_like(b), memory=initialised(fx)), fx["b.delta_memory"]
    )
    assert_close(model.compute_delta(a, attention_mask=torch.ones_like(a), memory=uninitialised), fx["a.delta_memory"])
    e = fx["input.prompt_e"]
    out = model.generate(
        e, attention_mask=torch.ones_like(e), memory=initialised(fx), max_new_tokens=8, do_sample=False
    )
    assert torch.equal(out, fx["e.sequences"])


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(model, fx):
    """Padding is a key mask over the text; the padded row's positions continue after the prefix as if unpadded."""
    d, e = fx["input.query_d"], fx["input.prompt_e"]
    ids = torch.stack([d[0], torch.cat([torch.full((2,), 2), e[0]])])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    logits = model(ids, attention_mask=mask, memory=initialised(fx)).logits
    assert_close(logits[:1], fx["d.logits"])
    assert_close(logits[1:, 2:], model(e, memory=initialised(fx)).logits)
    assert_close(logits[1:, -1], fx["e.step_logits"][:, 0])


@torch.no_grad()
def test_mask_of_the_originals_length_is_refused_or_honoured(golden_model_c, fx):
    d = fx["input.query_d"]
    rows = golden_model_c.config.memory_rows
    try:
        logits = golden_model_c(d, attention_mask=torch.ones(1, rows + d.shape[1]), memory=initialised(fx)).logits
    except ValueError:
        return
    assert_close(logits, fx["d.logits"])


@pytest.fixture(scope="module")
def golden_model_c():
    return load_c()


@torch.no_grad()
@pytest.mark.parametrize("initialized", [True, False], ids=["init1", "init0"])
@pytest.mark.parametrize("bos", [True, False], ids=["bos", "nobos"])
def test_generate_without_mask_equals_full_forward_loop(backend_model_pair, fx, bos, initialized):
    """The original crashes in `generate` without a mask, and at step 2 when `add_bos_embedding=False`."""
    model = backend_model_pair[bos]
    assert (model.bos_embedding is not None) == bos
    state = initialised(fx) if initialized else model.new_memory_state()
    out = model.generate(
        fx["input.prompt_e"],
        memory=state,
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    sequence, logits = full_forward_greedy(model, fx["input.prompt_e"], state, 8)
    assert torch.equal(out.sequences, sequence)
    assert_close(torch.stack(out.logits, dim=1), logits)
    if bos and initialized:
        assert torch.equal(out.sequences, fx["e.sequences"])


@torch.no_grad()
def test_pretraining_tp_is_ignored(fx):
    """The original raises `NotImplementedError` in attention for `pretraining_tp > 1`; the value changes nothing."""
    model = load_c(pretraining_tp=2)
    assert model.config.pretraining_tp == 2
    assert_close(model(fx["input.query_d"]).logits, fx["d.logits"])


def test_update_longer_than_the_memory_keeps_its_size(golden_model_c, fx):
    """The original: `AssertionError` at init = 1, a memory grown to T' rows at init = 0. Here: `ValueError`, and the
    last M rows (the memory has a fixed size)."""
    M0 = fx["input.memory_M0"]
    rows = M0.shape[1]
    delta = torch.randn(M0.shape[0], rows + 1, M0.shape[2], generator=torch.Generator().manual_seed(0))
    provenance = torch.zeros(M0.shape[:2], dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit"):
        golden_model_c.variant.update(MemoryState(M0, True, provenance), delta, 1)
    update = golden_model_c.variant.update(MemoryState(M0, False, provenance), delta, 1)
    assert update.initialized and update.memory.shape == M0.shape
    assert_close(update.memory, delta[:, -rows:], tol=0)


@pytest.fixture(scope="module", params=BACKENDS)
def backend_model_pair(request):
    return {True: load_c(request.param), False: load_c(request.param, add_bos_embedding=False)}


# ---------------------------------------------------------------------------------------------- memoryllm convert

CONVERTED_CHECK = r"""
import sys
sys.modules["modeling_memoryllm"] = None  # the package itself must not be importable
import json, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
folder, fixtures_path = sys.argv[1], sys.argv[2]
fx = load_file(fixtures_path)
results = {}
with torch.no_grad():
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation=attn).eval()
        logits = model(fx["input.query_d"]).logits
        close = (logits - fx["d.logits"]).abs() <= 1e-4 + 1e-4 * fx["d.logits"].abs()
        results[attn] = {"variant": model.config.memory_variant, "d": bool(close.all())}
print(json.dumps(results))
"""


@torch.no_grad()
def test_convert_7b_folder_and_reload(fx, raw_config, tmp_path):
    from modeling_memoryllm import cli

    out = tmp_path / "memoryllm-7b-tiny"
    assert cli.main(["convert", str(CHECKPOINT), str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["memory_variant"] == "memoryllm-7b" and "auto_map" in saved
    assert all(saved[key] == value for key, value in raw_config.items() if key not in REWRITTEN)
    assert '`memory_variant: "memoryllm-7b"`' in (out / "README.md").read_text()
    assert (out / "generation_config.json").exists()
    for backend in BACKENDS:
        model = load_c(backend, out)
        assert model.config.memory_variant == "memoryllm-7b"
        assert_close(model.memory, fx["input.memory_M0"], tol=0)
        assert_close(model(fx["input.query_d"]).logits, fx["d.logits"])
    results = run_offline_script(CONVERTED_CHECK, str(out), str(GOLDEN_C / "fixtures.safetensors"), cwd=tmp_path)
    assert results == {backend: {"variant": "memoryllm-7b", "d": True} for backend in BACKENDS}
