"""The independent 7B reference (`tests/reference_memoryllm7b.py`) pinned to golden C, then the package checked against
it on random 7B-like checkpoints in the released layout (loaded by `from_pretrained` from a released-style
`config.json`): no bos, other N/K, interpolation off, interpolation that changes nothing, linear `rope_scaling`
winning over the interpolation, a dead `rope_theta`, GQA (which the original cannot run). Public API only, SDPA and
eager attention, atol = rtol = 1e-4."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_memoryllm import MemoryLLMForCausalLM, MemoryState
from tests.conftest import assert_close, golden_path
from tests.reference_memoryllm7b import (
    ref_drop_count,
    ref_forward,
    ref_generate_greedy,
    ref_inject_delta,
    ref_update,
    rope_scale,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")
GOLDEN_C = golden_path("C")


# ------------------------------------------------------------------------------------- (a) reference vs golden C


@pytest.fixture(scope="module")
def fx():
    return load_file(GOLDEN_C / "fixtures.safetensors")


@pytest.fixture(scope="module")
def golden_ref():
    sd = load_file(GOLDEN_C / "checkpoint" / "model.safetensors")
    cfg = json.loads((GOLDEN_C / "checkpoint" / "config.json").read_text())
    return sd, cfg


def test_reference_scale_is_the_recorded_one(golden_ref):
    meta = json.loads((GOLDEN_C / "fixtures.json").read_text())["derived"]
    assert rope_scale(golden_ref[1]) == pytest.approx(meta["rope_position_scale"], abs=1e-12)


@pytest.mark.parametrize("name", ["a", "a2"])
def test_reference_golden_uninitialised_injection(golden_ref, fx, name):
    sd, cfg = golden_ref
    delta, _ = ref_inject_delta(sd, cfg, fx["input.memory_M0"], False, fx[f"input.ctx_{name}"])
    assert delta.shape == fx[f"{name}.delta_memory"].shape[1:]
    assert_close(delta, fx[f"{name}.delta_memory"][0])
    assert_close(ref_update(cfg, fx["input.memory_M0"], False, delta), fx[f"{name}.memory_after"])


def test_reference_golden_injection(golden_ref, fx):
    sd, cfg = golden_ref
    delta, logits = ref_inject_delta(sd, cfg, fx["input.memory_M0"], True, fx["input.ctx_b"])
    assert_close(delta, fx["b.delta_memory"][0])
    assert_close(logits, fx["b.injection_logits"][0])
    delta_c, _ = ref_inject_delta(sd, cfg, fx["input.memory_M0"], True, fx["input.ctx_c"])
    assert_close(delta_c, fx["c.delta_memory"][0])


def test_reference_golden_forward_and_cache(golden_ref, fx):
    sd, cfg = golden_ref
    logits, keys, values = ref_forward(sd, cfg, fx["input.memory_M0"], True, fx["input.query_d"])
    assert_close(logits, fx["d.logits"][0])
    assert_close(keys[0], fx["d.past_key_layer0"][0])
    assert_close(values[0], fx["d.past_value_layer0"][0])
    assert_close(keys[-1], fx["d.past_key_lastlayer"][0])
    logits_h, _, _ = ref_forward(sd, cfg, fx["input.memory_M0"], False, fx["input.query_d"])
    assert_close(logits_h, fx["h.logits_uninitialised"][0])


def test_reference_golden_generation(golden_ref, fx):
    sd, cfg = golden_ref
    prompt, seq = fx["input.prompt_e"][0], fx["e.sequences"][0]
    assert ref_generate_greedy(sd, cfg, fx["input.memory_M0"], True, prompt, 8) == seq[len(prompt) :].tolist()
    logits, _, _ = ref_forward(sd, cfg, fx["input.memory_M0"], True, seq[:-1])
    assert_close(logits[len(prompt) - 1 :], fx["e.step_logits"][0])


def test_reference_golden_update_then_read(golden_ref, fx):
    sd, cfg = golden_ref
    memory = ref_update(cfg, fx["input.memory_M0"], True, fx["b.delta_memory"][0], fx["f.kept_indices"])
    assert_close(memory, fx["f.memory_after"], tol=0)
    assert_close(ref_forward(sd, cfg, memory, True, fx["input.query_d"])[0], fx["g.logits"][0])


def test_reference_golden_kept_indices_are_the_shared_randperm(fx, golden_ref):
    cfg = golden_ref[1]
    M = cfg["num_tokens"] * cfg["num_blocks"]
    torch.manual_seed(123)
    keep = M - ref_drop_count(cfg, cfg["num_tokens"])
    assert torch.equal(torch.randperm(M)[:keep].sort().values, fx["f.kept_indices"])


# ------------------------------------------------------------------ (b) package vs reference on random 7B-like sets

NEVER_READ = {
    "add_positional_embedding": True,
    "shrink_to_one_embedding": True,
    "split_positional_embedding": True,
    "new_memory_embedding_fullset": True,
    "delta_memory_ratio": 1.0,
    "new_delta_memory_length": 8.0,
    "drop_memory_token": False,
    "share_position_ids": False,
    "use_negative_position_ids": False,
    "put_memory_on_cpu": False,
    "add_pad_token": False,
    "pad_to_max_length": False,
}
# name: overrides of BASE. s (the position scale) differs between them: 2/3, 0.4, 1, 1, 0.4, 2/3.
SETS = {
    "interp": {},
    "nobos": {"add_bos_embedding": False, "num_tokens": 5, "num_blocks": 4, "max_position_embeddings": 10},
    "interp-off": {"interpolate_position_ids": False, "rope_theta": 5e5},
    "span-fits": {"max_position_embeddings": 4096},
    "linear-wins": {"rope_scaling": {"type": "linear", "factor": 2.5}, "rope_theta": 5e5},
    "gqa": {"num_attention_heads": 6, "num_key_value_heads": 2, "rope_theta": 5e5},
}
BASE = {
    "architectures": ["MemoryLLM"],
    "model_type": "memoryllm",
    "vocab_size": 300,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "num_tokens": 6,
    "num_blocks": 3,
    "add_bos_embedding": True,
    "interpolate_position_ids": True,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "torch_dtype": "float32",
    **NEVER_READ,
}


def random_state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter random (`e` included), plain `<module>.weight` keys (no adapters); memory M0 = sd["memory"]."""
    g = torch.Generator().manual_seed(seed)
    d, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d)}
    shapes |= {"self_attn.o_proj": (d, d), "mlp.gate_proj": (inter, d), "mlp.up_proj": (inter, d)}
    shapes |= {"mlp.down_proj": (d, inter)}
    sd = {"model.embed_tokens.weight": randn(cfg["vocab_size"], d)}
    for li in range(L):
        for name, (out, inp) in shapes.items():
            sd[f"model.layers.{li}.{name}.weight"] = randn(out, inp, scale=inp**-0.5)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{li}.{norm}.weight"] = 1 + randn(d, scale=0.1)
    sd["model.norm.weight"] = 1 + randn(d, scale=0.1)
    sd["lm_head.weight"] = randn(cfg["vocab_size"], d, scale=d**-0.5)
    sd["memory"] = randn(L, cfg["num_tokens"] * cfg["num_blocks"], d)
    if cfg["add_bos_embedding"]:
        sd["bos_embedding"] = randn(L, 1, d)
    sd["new_memory_positional_emb"] = randn(1, 1, d, scale=0.5)
    sd["initialized"] = torch.tensor(1, dtype=torch.uint8)
    return sd


@pytest.fixture(scope="module", params=sorted(SETS))
def set_7b(request, tmp_path_factory):
    """(cfg, sd, ids by length, released-layout folder)."""
    cfg = {**BASE, **SETS[request.param]}
    sd = random_state_dict(cfg, seed=sorted(SETS).index(request.param) + 700)
    folder = tmp_path_factory.mktemp(f"set7b_{request.param}")
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(sd, folder / "model.safetensors")
    N, g = cfg["num_tokens"], torch.Generator().manual_seed(99)
    lengths = (3 * N + 2, N, N - 3, 7)
    ids = {n: torch.randint(3, cfg["vocab_size"], (n,), generator=g) for n in lengths}
    return cfg, sd, ids, folder


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model_7b(request, set_7b):
    model = MemoryLLMForCausalLM.from_pretrained(set_7b[3], attn_implementation=request.param, dtype=torch.float32)
    return model.eval()


def m0(set_7b) -> torch.Tensor:
    return set_7b[1]["memory"]


def state_of(set_7b, initialized: bool, model) -> MemoryState:
    return MemoryState(m0(set_7b).clone(), True) if initialized else model.new_memory_state()


def test_loads_as_the_7b_variant(model_7b, set_7b):
    cfg = set_7b[0]
    assert model_7b.config.memory_variant == "memoryllm-7b"
    assert model_7b.config.adapter_names == ()
    assert not any("lora" in name for name, _ in model_7b.named_parameters())
    assert torch.equal(model_7b.memory, m0(set_7b))
    assert (model_7b.bos_embedding is not None) == cfg["add_bos_embedding"]


@torch.no_grad()
@pytest.mark.parametrize("initialized", [True, False], ids=["init1", "init0"])
def test_forward_logits_and_cache(model_7b, set_7b, initialized):
    cfg, sd, ids, _ = set_7b
    out = model_7b(ids[7][None], memory=state_of(set_7b, initialized, model_7b), use_cache=True)
    logits, keys, values = ref_forward(sd, cfg, m0(set_7b), initialized, ids[7])
    assert_close(out.logits[0], logits)
    cache = getattr(out, "cache", None) or out.past_key_values
    for layer in (0, cfg["num_hidden_layers"] - 1):
        assert cache.layers[layer].keys.shape[1:] == keys[layer].shape
        assert_close(cache.layers[layer].keys[0], keys[layer])
        assert_close(cache.layers[layer].values[0], values[layer])


@torch.no_grad()
@pytest.mark.parametrize("kind", ["long", "exact", "short"])
@pytest.mark.parametrize("initialized", [True, False], ids=["init1", "init0"])
def test_compute_delta_and_injection_logits(model_7b, set_7b, initialized, kind):
    cfg, sd, ids, _ = set_7b
    N = cfg["num_tokens"]
    length = {"long": 3 * N + 2, "exact": N, "short": N - 3}[kind]
    state = state_of(set_7b, initialized, model_7b)
    delta, logits = model_7b.compute_delta(ids[length][None], memory=state, output_logits=True)
    ref_delta, ref_logits = ref_inject_delta(sd, cfg, m0(set_7b), initialized, ids[length])
    assert delta.shape == (1, cfg["num_hidden_layers"], N if initialized else min(N, length), cfg["hidden_size"])
    assert_close(delta[0], ref_delta)
    assert_close(logits[0], ref_logits)


def matched_rows(old: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Indices `[L, keep]` of the rows of `old` `[L, M, d]` that `kept` `[L, keep, d]` holds (exact copies)."""
    match = (kept[:, :, None, :] == old[:, None, :, :]).all(-1)
    assert bool((match.sum(-1) == 1).all()), "every kept row is exactly one row of the old memory"
    return match.float().argmax(-1)


def assert_shared_drop_and_append(cfg, old, new, ref_delta) -> None:
    keep = cfg["num_tokens"] * cfg["num_blocks"] - ref_drop_count(cfg, ref_delta.shape[1])
    assert new.shape == old.shape
    idx = matched_rows(old, new[:, :keep])
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "surviving rows keep their order"
    assert bool((idx == idx[:1]).all()), "one drop shared by every layer"
    assert_close(new, ref_update(cfg, old, True, ref_delta, idx[0]))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["long", "short"])
def test_inject_updates_initialised_memory(model_7b, set_7b, kind):
    cfg, sd, ids, _ = set_7b
    length = 3 * cfg["num_tokens"] + 2 if kind == "long" else cfg["num_tokens"] - 3
    state = MemoryState(m0(set_7b).clone(), True)
    model_7b.inject(ids[length][None], memory=state, generator=torch.Generator().manual_seed(0))
    ref_delta, _ = ref_inject_delta(sd, cfg, m0(set_7b), True, ids[length])
    assert_shared_drop_and_append(cfg, m0(set_7b), state.memory, ref_delta)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["long", "short"])
def test_inject_tiles_uninitialised_memory_then_reads_it(model_7b, set_7b, kind):
    cfg, sd, ids, _ = set_7b
    length = 3 * cfg["num_tokens"] + 2 if kind == "long" else cfg["num_tokens"] - 3
    state = model_7b.new_memory_state()
    model_7b.inject(ids[length][None], memory=state)
    ref_delta, _ = ref_inject_delta(sd, cfg, m0(set_7b), False, ids[length])
    expected = ref_update(cfg, m0(set_7b), False, ref_delta)
    assert state.initialized
    assert_close(state.memory, expected)
    assert_close(model_7b(ids[7][None], memory=state).logits[0], ref_forward(sd, cfg, expected, True, ids[7])[0])


@torch.no_grad()
def test_update_rule(model_7b, set_7b):
    cfg, sd, ids, _ = set_7b
    L, N, M = cfg["num_hidden_layers"], cfg["num_tokens"], cfg["num_tokens"] * cfg["num_blocks"]
    ref_delta, _ = ref_inject_delta(sd, cfg, m0(set_7b), True, ids[3 * N + 2])
    provenance = torch.zeros(L, M, dtype=torch.long)
    gen = torch.Generator().manual_seed(5)
    for delta in (ref_delta, ref_delta[:, -3:]):  # N rows: drop int(M/K); other sizes: drop as many as written
        update = model_7b.variant.update(MemoryState(m0(set_7b), True, provenance), delta, 1, gen)
        assert_shared_drop_and_append(cfg, m0(set_7b), update.memory, delta)
        assert bool((update.provenance[:, -delta.shape[1] :] == 1).all())
    for rows in (N, N - 1, M):  # tiling with and without remainder, and a delta as long as the memory
        delta = torch.randn(L, rows, cfg["hidden_size"], generator=gen)
        update = model_7b.variant.update(MemoryState(m0(set_7b), False, provenance), delta, 1, gen)
        assert update.initialized
        assert_close(update.memory, ref_update(cfg, m0(set_7b), False, delta), tol=0)


@torch.no_grad()
@pytest.mark.parametrize("initialized", [True, False], ids=["init1", "init0"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "textmask"])
def test_greedy_generation(model_7b, set_7b, initialized, with_mask):
    cfg, sd, ids, _ = set_7b
    prompt, steps = ids[7], 5
    mask = {"attention_mask": torch.ones(1, len(prompt), dtype=torch.long)} if with_mask else {}
    out = model_7b.generate(
        prompt[None],
        memory=state_of(set_7b, initialized, model_7b),
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **mask,
    )
    new = out.sequences[0, len(prompt) :].tolist()
    assert len(new) == steps or new[-1] == cfg["eos_token_id"]  # stops early only at eos
    assert new == ref_generate_greedy(sd, cfg, m0(set_7b), initialized, prompt, len(new))
    ref_logits, _, _ = ref_forward(sd, cfg, m0(set_7b), initialized, out.sequences[0, :-1])
    assert_close(torch.stack(out.logits, dim=1)[0], ref_logits[len(prompt) - 1 :])
