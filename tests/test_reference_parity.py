"""The independent reference (`tests/reference_memoryllm.py`) pinned to golden A, then the package checked against it
on a second random checkpoint ("set B": shared drop, a single LoRA adapter, no RoPE scaling; with and without bos),
through the public API only, under SDPA and eager attention (atol = rtol = 1e-4)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from modeling_memoryllm import MemoryLLMConfig, MemoryLLMForCausalLM, MemoryState
from tests.conftest import assert_close
from tests.reference_memoryllm import (
    ref_drop_count,
    ref_forward,
    ref_generate_greedy,
    ref_inject_delta,
    ref_update,
)


# ------------------------------------------------------------------------------------- (a) reference vs golden A


@pytest.fixture(scope="module")
def golden_ref(golden_dir):
    sd = load_file(golden_dir / "checkpoint" / "model.safetensors")
    cfg = json.loads((golden_dir / "checkpoint" / "config.json").read_text())
    return sd, cfg


@pytest.mark.parametrize("name", ["a", "a2"])
def test_reference_golden_uninitialised_injection(golden_ref, fixtures, name):
    sd, cfg = golden_ref
    m0 = fixtures["input.memory_M0"]
    delta, _ = ref_inject_delta(sd, cfg, m0, False, fixtures[f"input.ctx_{name}"])
    assert delta.shape == fixtures[f"{name}.delta_memory"].shape[1:]
    assert_close(delta, fixtures[f"{name}.delta_memory"][0])
    assert_close(ref_update(cfg, m0, False, delta), fixtures[f"{name}.memory_after"])


def test_reference_golden_injection(golden_ref, fixtures):
    sd, cfg = golden_ref
    m0 = fixtures["input.memory_M0"]
    delta, logits = ref_inject_delta(sd, cfg, m0, True, fixtures["input.ctx_b"])
    assert_close(delta, fixtures["b.delta_memory"][0])
    assert_close(logits, fixtures["b.injection_logits"][0])
    delta_c, _ = ref_inject_delta(sd, cfg, m0, True, fixtures["input.ctx_c"])  # short context: memory-row queries
    assert_close(delta_c, fixtures["c.delta_memory"][0])


def test_reference_golden_forward_and_cache(golden_ref, fixtures):
    sd, cfg = golden_ref
    m0 = fixtures["input.memory_M0"]
    logits, keys, values = ref_forward(sd, cfg, m0, True, fixtures["input.query_d"])
    assert_close(logits, fixtures["d.logits"][0])
    assert_close(keys[0], fixtures["d.past_key_layer0"][0])
    assert_close(values[0], fixtures["d.past_value_layer0"][0])
    assert_close(keys[-1], fixtures["d.past_key_lastlayer"][0])
    logits_h, _, _ = ref_forward(sd, cfg, m0, False, fixtures["input.query_d"])
    assert_close(logits_h, fixtures["h.logits_uninitialised"][0])


def test_reference_golden_generation(golden_ref, fixtures):
    sd, cfg = golden_ref
    m0, prompt, seq = fixtures["input.memory_M0"], fixtures["input.prompt_e"][0], fixtures["e.sequences"][0]
    assert ref_generate_greedy(sd, cfg, m0, True, prompt, 8) == seq[len(prompt) :].tolist()
    logits, _, _ = ref_forward(sd, cfg, m0, True, seq[:-1])  # one full forward gives every step's logits
    assert_close(logits[len(prompt) - 1 :], fixtures["e.step_logits"][0])


def test_reference_golden_update_then_read(golden_ref, fixtures):
    sd, cfg = golden_ref
    m0, kept = fixtures["input.memory_M0"], fixtures["f.kept_indices"]
    assert ref_drop_count(cfg, cfg["num_tokens"]) == cfg["num_tokens"]
    memory = ref_update(cfg, m0, True, fixtures["b.delta_memory"][0], kept)
    assert_close(memory, fixtures["f.memory_after"], tol=0)
    logits, _, _ = ref_forward(sd, cfg, memory, True, fixtures["input.query_d"])
    assert_close(logits, fixtures["g.logits"][0])


# ---------------------------------------------------------------------- (b) package vs reference on random set B

N, K, L = 16, 3, 5
TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def config_b(add_bos_embedding: bool) -> dict:
    return {
        "vocab_size": 600,
        "hidden_size": 96,
        "intermediate_size": 200,
        "num_hidden_layers": L,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e4,
        "rope_scaling": None,
        "num_tokens": N,
        "num_blocks": K,
        "add_bos_embedding": add_bos_embedding,
        "drop_memory_per_layer": False,
        "add_decoder_lora": False,
        "lora_config": {"r": 8, "lora_alpha": 12, "lora_dropout": 0.0, "target_modules": TARGETS},
    }


def random_state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter random (LoRA B and `e` included), in the released layout; memory M0 = `sd["memory"]`."""
    g = torch.Generator().manual_seed(seed)
    d, inter, r = cfg["hidden_size"], cfg["intermediate_size"], cfg["lora_config"]["r"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    sd = {"model.embed_tokens.weight": randn(cfg["vocab_size"], d)}
    shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d)}
    shapes |= {"gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    for li in range(cfg["num_hidden_layers"]):
        for mod, (out, inp) in shapes.items():
            name = f"model.layers.{li}.{'mlp' if mod in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{mod}"
            if mod not in TARGETS:
                sd[f"{name}.weight"] = randn(out, inp, scale=inp**-0.5)
                continue
            sd[f"{name}.base_layer.weight"] = randn(out, inp, scale=inp**-0.5)
            sd[f"{name}.lora_A.default.weight"] = randn(r, inp, scale=inp**-0.5)
            sd[f"{name}.lora_B.default.weight"] = randn(out, r, scale=0.3 * r**-0.5)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{li}.{norm}.weight"] = 1 + randn(d, scale=0.1)
    sd["model.norm.weight"] = 1 + randn(d, scale=0.1)
    sd["lm_head.weight"] = randn(cfg["vocab_size"], d, scale=d**-0.5)
    sd["memory"] = randn(cfg["num_hidden_layers"], N * K, d)
    if cfg["add_bos_embedding"]:
        sd["bos_embedding"] = randn(cfg["num_hidden_layers"], 1, d)
    sd["new_memory_positional_emb"] = randn(1, 1, d, scale=0.5)
    sd["initialized"] = torch.tensor(1, dtype=torch.uint8)
    return sd


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "nobos"])
def set_b(request):
    cfg = config_b(request.param)
    sd = random_state_dict(cfg, seed=1234 + int(request.param))
    g = torch.Generator().manual_seed(99)
    ids = {length: torch.randint(0, cfg["vocab_size"], (length,), generator=g) for length in (3 * N + 2, N, N - 5, 7)}
    return cfg, sd, ids


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model_b(request, set_b):
    cfg, sd, _ = set_b
    kwargs = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    config = MemoryLLMConfig(
        **kwargs,
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        attn_implementation=request.param,
    )
    model = MemoryLLMForCausalLM(config).eval()
    model.load_state_dict(sd, strict=True)  # the released key names
    return model


def m0(set_b) -> torch.Tensor:
    return set_b[1]["memory"]


def state_of(set_b, initialized: bool, model) -> MemoryState:
    return MemoryState(m0(set_b).clone(), True) if initialized else model.new_memory_state()


@torch.no_grad()
@pytest.mark.parametrize("initialized", [True, False], ids=["init1", "init0"])
def test_forward_logits_and_cache(model_b, set_b, initialized):
    cfg, sd, ids = set_b
    out = model_b(ids[7][None], memory=state_of(set_b, initialized, model_b), use_cache=True)
    logits, keys, values = ref_forward(sd, cfg, m0(set_b), initialized, ids[7])
    assert_close(out.logits[0], logits)
    cache = getattr(out, "cache", None) or out.past_key_values
    for layer in (0, L - 1):
        assert cache.layers[layer].keys.shape[-2] == keys[layer].shape[-2]
        assert_close(cache.layers[layer].keys[0], keys[layer])
        assert_close(cache.layers[layer].values[0], values[layer])


@torch.no_grad()
@pytest.mark.parametrize("length", [3 * N + 2, N, N - 5], ids=["long", "exact", "short"])
@pytest.mark.parametrize("initialized", [True, False], ids=["init1", "init0"])
def test_compute_delta_and_injection_logits(model_b, set_b, initialized, length):
    cfg, sd, ids = set_b
    state = state_of(set_b, initialized, model_b)
    delta, logits = model_b.compute_delta(ids[length][None], memory=state, output_logits=True)
    ref_delta, ref_logits = ref_inject_delta(sd, cfg, m0(set_b), initialized, ids[length])
    assert delta.shape == (1, L, N if initialized else min(N, length), cfg["hidden_size"])
    assert_close(delta[0], ref_delta)
    assert_close(logits[0], ref_logits)
    if initialized:
        assert_close(state.memory, m0(set_b), tol=0)  # compute_delta changes nothing


def kept_rows(old: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Indices `[L, keep]` of `old`'s rows that `kept` `[L, keep, d]` holds (exact copies)."""
    match = (kept[:, :, None, :] == old[:, None, :, :]).all(-1)  # [L, keep, M]
    assert bool((match.sum(-1) == 1).all()), "every kept row is exactly one row of the old memory"
    return match.float().argmax(-1)


def assert_drop_and_append(cfg: dict, old: torch.Tensor, new: torch.Tensor, ref_delta: torch.Tensor) -> None:
    keep = N * K - ref_drop_count(cfg, ref_delta.shape[1])
    assert new.shape == old.shape
    idx = kept_rows(old, new[:, :keep])  # [L, keep]
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "surviving rows keep their order"
    assert bool((idx == idx[:1]).all()), "shared drop: the same rows survive in every layer"
    assert_close(new, ref_update(cfg, old, True, ref_delta, idx[0]))


@torch.no_grad()
@pytest.mark.parametrize("length", [3 * N + 2, N - 5], ids=["long", "short"])
def test_inject_updates_initialised_memory(model_b, set_b, length):
    cfg, sd, ids = set_b
    state = MemoryState(m0(set_b).clone(), True)
    model_b.inject(ids[length][None], memory=state, generator=torch.Generator().manual_seed(0))
    ref_delta, _ = ref_inject_delta(sd, cfg, m0(set_b), True, ids[length])
    assert_drop_and_append(cfg, m0(set_b), state.memory, ref_delta)


@torch.no_grad()
@pytest.mark.parametrize("length", [3 * N + 2, N - 5], ids=["long", "short"])
def test_inject_tiles_uninitialised_memory(model_b, set_b, length):
    cfg, sd, ids = set_b
    state = model_b.new_memory_state()
    model_b.inject(ids[length][None], memory=state, generator=torch.Generator().manual_seed(0))
    ref_delta, _ = ref_inject_delta(sd, cfg, m0(set_b), False, ids[length])
    assert state.initialized
    assert_close(state.memory, ref_update(cfg, m0(set_b), False, ref_delta))
    # the next read sees the tiled memory
    logits = model_b(ids[7][None], memory=state).logits[0]
    assert_close(logits, ref_forward(sd, cfg, ref_update(cfg, m0(set_b), False, ref_delta), True, ids[7])[0])


@torch.no_grad()
def test_compute_update(model_b, set_b):
    cfg, sd, ids = set_b
    ref_delta, _ = ref_inject_delta(sd, cfg, m0(set_b), True, ids[3 * N + 2])
    provenance = torch.zeros(L, N * K, dtype=torch.long)
    gen = torch.Generator().manual_seed(5)
    update = model_b.variant.update(MemoryState(m0(set_b), True, provenance), ref_delta, 1, gen)
    assert_drop_and_append(cfg, m0(set_b), update.memory, ref_delta)
    assert bool((update.provenance[:, -N:] == 1).all()) and bool((update.provenance[:, :-N] == 0).all())
    for rows in (N, N - 3, 3 * N + 1):  # tiling with and without remainder, and truncation
        delta = torch.randn(L, rows, cfg["hidden_size"], generator=gen)
        update = model_b.variant.update(MemoryState(m0(set_b), False, provenance), delta, 1, gen)
        assert_close(update.memory, ref_update(cfg, m0(set_b), False, delta), tol=0)


@torch.no_grad()
@pytest.mark.parametrize("initialized", [True, False], ids=["init1", "init0"])
def test_greedy_generation(model_b, set_b, initialized):
    cfg, sd, ids = set_b
    prompt, steps = ids[7], 6
    out = model_b.generate(
        prompt[None],
        memory=state_of(set_b, initialized, model_b),
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(prompt) :].tolist()
    assert new == ref_generate_greedy(sd, cfg, m0(set_b), initialized, prompt, steps)
    ref_logits, _, _ = ref_forward(sd, cfg, m0(set_b), initialized, out.sequences[0, :-1])
    assert_close(torch.stack(out.logits, dim=1)[0], ref_logits[len(prompt) - 1 :])
