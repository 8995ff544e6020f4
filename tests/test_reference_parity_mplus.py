"""The independent M+ reference (`tests/reference_mplus.py`) pinned to golden E, then the package checked against it
on random M+ checkpoints with other options (no bos, one selector layer, one adapter, other N / blocks / merge
frequency / decay, a small LTM), through the public API, sdpa and eager (atol = rtol = 1e-4)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_memoryllm import MemoryLLMForCausalLM
from modeling_memoryllm.memory_state_mplus import MPlusMemoryState
from tests.conftest import assert_close, golden_path
from tests.reference_mplus import llama3_inv_freq, ref_forward, ref_update
from tests.test_reference_parity import random_state_dict


pytestmark = pytest.mark.usefixtures("one_torch_thread")
GOLDEN_E = golden_path("E")


def reference_state(state: MPlusMemoryState) -> dict:
    """The package's state as the reference's plain dict (copies)."""
    return {
        "stm": state.memory.clone(),
        "stm_ages": state.stm_ages.clone(),
        "ltm": [t.clone() for t in state.ltm],
        "keys": [t.clone() for t in state.ltm_keys],
        "ages": [t.clone() for t in state.ltm_ages],
        "rf": [t.clone() for t in state.ltm_rf],
        "buf_rows": list(state.buffer_rows.clone()),
        "buf_keys": list(state.buffer_keys.clone()),
        "buf_ages": list(state.buffer_ages.clone()),
        "step": state.update_step,
    }


# ------------------------------------------------------------------------------------- the reference vs golden E
def test_reference_reproduces_golden_e():
    fx = load_file(GOLDEN_E / "fixtures.safetensors")
    cfg = json.loads((GOLDEN_E / "checkpoint" / "config.json").read_text())
    sd = load_file(GOLDEN_E / "checkpoint" / "model.safetensors")
    assert_close(llama3_inv_freq(cfg, 16), fx["rope.inv_freq"], tol=1e-6)
    layers = range(cfg["num_hidden_layers"])
    state = {
        "stm": fx["input.stm_M0"], "stm_ages": fx["input.stm_ages0"].double(),
        "ltm": list(fx["input.ltm0"]), "keys": list(fx["input.ltm_keys0"]),
        "ages": list(fx["input.ltm_ages0"].double()), "rf": list(fx["input.ltm_rf0"].double()),
        "buf_rows": [torch.zeros(0, 64) for _ in layers], "buf_keys": [torch.zeros(0, 16) for _ in layers],
        "buf_ages": [torch.zeros(0, dtype=torch.float64) for _ in layers], "step": 0,
    }  # fmt: skip
    generator = torch.Generator().manual_seed(123)
    after_f1 = ref_update(sd, cfg, state, fx["f1.delta_memory"][0], generator)
    assert_close(after_f1["stm"], fx["f1.stm_after"])
    assert_close(torch.stack(after_f1["buf_keys"]), fx["f1.cache_keys"])
    after_g = ref_update(sd, cfg, after_f1, fx["g.delta_memory"][0], generator)
    for layer in layers:
        assert_close(after_g["ltm"][layer], fx[f"g.ltm_after.{layer}"])
        assert_close(after_g["rf"][layer], fx[f"g.ltm_rf_after.{layer}"], tol=0)


# ----------------------------------------------------------------------------- random checkpoints, other options
OPTIONS = {
    "nobos-onelayer": dict(add_bos_embedding=False, num_selector_layers=1, num_tokens=4, num_blocks=5,
                           num_ltm_blocks=2),
    "bos-2layers-merge1": dict(add_bos_embedding=True, num_selector_layers=2, num_tokens=6, num_blocks=4,
                               num_ltm_blocks=1, update_ltm_frequency=1, decay_frequency=2,
                               initial_rf_when_moving_stm_to_ltm=5),
    "undo-decay": dict(add_bos_embedding=True, num_selector_layers=2, num_tokens=4, num_blocks=6, num_ltm_blocks=3,
                       recall_frequency=1.0),  # every stored row would go: too few survive, the decay is undone
    "single-adapter": dict(add_bos_embedding=True, num_selector_layers=2, num_tokens=4, num_blocks=6, num_ltm_blocks=3,
                           add_decoder_lora=False, rope_scaling={"type": "linear", "factor": 2.0}),
}  # fmt: skip


def mplus_config(options: dict) -> dict:
    base = dict(
        vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None, add_decoder_lora=True,
        drop_memory_per_layer=True, selector_hidden_dim=8, ltm_initial_size=0, update_ltm_frequency=2,
        decay_frequency=1, initial_rf_when_moving_stm_to_ltm=3, update_ltm_mode="immediate", add_selector=True,
        recall_frequency=None,
        lora_config={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
    )  # fmt: skip
    base.update(options)
    return base


def mplus_state_dict(cfg: dict, seed: int, ltm_rows: list[int]) -> dict[str, torch.Tensor]:
    sd = random_state_dict(cfg, seed)
    if cfg["add_decoder_lora"]:  # a second, different adapter for reading
        for name in [n for n in sd if ".lora_" in n and ".default." in n]:
            sd[name.replace(".default.", ".decoder_adapter.")] = sd[name].flip(0) * 0.7
    g = torch.Generator().manual_seed(seed + 1)
    d, s, layers = cfg["hidden_size"], cfg["selector_hidden_dim"], cfg["num_hidden_layers"]
    stm_rows = (cfg["num_blocks"] - cfg["num_ltm_blocks"]) * cfg["num_tokens"]
    sd["memory"] = torch.randn(layers, stm_rows, d, generator=g)
    two_layers = [("0.weight", (2 * s, d)), ("2.weight", (s, 2 * s))]
    shapes = [("weight", (s, d))] if cfg["num_selector_layers"] == 1 else two_layers
    for layer in range(layers):
        for proj in ("query_proj", "key_proj", "encoder_query_proj"):
            for suffix, shape in shapes:
                sd[f"model.layers.{layer}.self_attn.{proj}.{suffix}"] = (
                    torch.randn(shape, generator=g) / shape[1] ** 0.5
                )
        sd[f"ltm.{layer}"] = torch.randn(ltm_rows[layer], d, generator=g)
        sd[f"ltm_keys.{layer}"] = torch.randn(ltm_rows[layer], s, generator=g)
        sd[f"ltm_ages.{layer}"] = (torch.randperm(ltm_rows[layer], generator=g) * 3 + 100).float()
        rf = torch.randint(1, 5, (ltm_rows[layer],), generator=g).float()
        sd[f"ltm_recall_frequencies.{layer}"] = (
            rf if cfg["recall_frequency"] is None else rf * 0 + cfg["recall_frequency"]
        )
    sd.pop("initialized")
    return sd


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def random_mplus(request, tmp_path_factory):
    cfg = mplus_config(OPTIONS[request.param])
    slots = cfg["num_ltm_blocks"] * cfg["num_tokens"]
    ltm_rows = [slots + 3, slots + 7, slots - 2]  # the last layer's LTM is small: tiled
    sd = mplus_state_dict(cfg, seed=sum(map(ord, request.param)), ltm_rows=ltm_rows)
    folder = tmp_path_factory.mktemp(request.param)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    released = {**cfg, "ltm_initial_size": ltm_rows[0], "model_type": "llama", "architectures": ["MPlus"]}
    (folder / "config.json").write_text(json.dumps(released))
    return cfg, sd, folder, ltm_rows


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_package_equals_reference(random_mplus, attn):
    cfg, sd, folder, ltm_rows = random_mplus
    model = MemoryLLMForCausalLM.from_pretrained(folder, attn_implementation=attn, ignore_mismatched_sizes=True).eval()
    assert model.config.memory_variant == "mplus"
    state = model.new_memory_state()
    state.take(ragged_state(sd, cfg, ltm_rows))
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(1, cfg["vocab_size"], (n,), generator=g) for n in (9, 2 * cfg["num_tokens"] + 1, 3)]
    reference = reference_state(state)
    for step in range(3):
        query = ids[step % 3]
        assert_close(model(query[None], memory=state).logits[0], ref_forward(sd, cfg, reference, query))
        delta = model.compute_delta(ids[(step + 1) % 3][None], memory=state)[0]
        seed = 1000 + step
        model.inject(ids[(step + 1) % 3], memory=state, generator=torch.Generator().manual_seed(seed))
        reference = ref_update(sd, cfg, reference, delta, torch.Generator().manual_seed(seed))
        assert_close(state.memory, reference["stm"])
        assert state.update_step == reference["step"]
        for layer in range(cfg["num_hidden_layers"]):
            assert_close(state.ltm[layer], reference["ltm"][layer])
            assert_close(state.ltm_rf[layer], reference["rf"][layer], tol=0)
            assert_close(state.buffer_keys[layer], reference["buf_keys"][layer])


def ragged_state(sd, cfg, ltm_rows) -> MPlusMemoryState:
    """The checkpoint's memory with a ragged LTM (layers of different sizes), STM ages all distinct."""
    layers = cfg["num_hidden_layers"]
    ltm = {
        "ltm": [sd[f"ltm.{i}"] for i in range(layers)],
        "ltm_keys": [sd[f"ltm_keys.{i}"] for i in range(layers)],
        "ltm_ages": [sd[f"ltm_ages.{i}"].double() for i in range(layers)],
        "ltm_rf": [sd[f"ltm_recall_frequencies.{i}"].double() for i in range(layers)],
    }
    memory = sd["memory"].clone()
    draws = [torch.randperm(memory.shape[1], generator=torch.Generator().manual_seed(i)) for i in range(layers)]
    ages = torch.stack(draws) * 3 + 1000
    s = cfg["selector_hidden_dim"]
    buffer = (torch.zeros(layers, 0, memory.shape[2]), torch.zeros(layers, 0, s), torch.zeros(layers, 0))
    return MPlusMemoryState(memory, ages.double(), ltm, buffer)
