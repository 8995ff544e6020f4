"""The published variants in `hub_configs/`: configs load in every supported transformers, shapes and parameter
counts match the variant's specification (recomputed here by formula), and the model cards parse as Hub cards."""

import json
import pathlib

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, GenerationConfig

import modeling_memoryllm  # noqa: F401  (registers "memoryllm" with the Auto classes)
from modeling_memoryllm import MemoryLLMConfig, MemoryLLMForCausalLM
from tests.conftest import golden_path


HUB_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "hub_configs"
GOLDEN_C = golden_path("C")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
AUTO_MAP = {
    "AutoConfig": "configuration_memoryllm.MemoryLLMConfig",
    "AutoModel": "modeling_memoryllm.MemoryLLMForCausalLM",
    "AutoModelForCausalLM": "modeling_memoryllm.MemoryLLMForCausalLM",
}
LLAMA_3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "bos_token_id": 128000,
    "tie_word_embeddings": False,
    "num_tokens": 256,
    "num_blocks": 50,
    "add_bos_embedding": True,
    "drop_memory_per_layer": True,
    "add_decoder_lora": True,
    # the released values: dropout 0.1 (identity at inference) and `inference_mode`, which the original reads
    "lora_config": {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.1,
        "inference_mode": True,
        "target_modules": LORA_TARGETS,
    },
    "max_inject_length": 512,
    "memory_variant": "memoryllm-8b",
}
LLAMA_2_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "tie_word_embeddings": False,
}
# The released 7B config's keys that the code never reads (SEMANTICS-7B.md): kept as released.
NEVER_READ_7B = (
    "add_positional_embedding",
    "shrink_to_one_embedding",
    "split_positional_embedding",
    "new_memory_embedding_fullset",
    "delta_memory_ratio",
    "new_delta_memory_length",
    "drop_memory_token",
    "share_position_ids",
    "use_negative_position_ids",
    "put_memory_on_cpu",
    "add_pad_token",
    "pad_to_max_length",
)
# Each variant: the config fields it must have, its RoPE, dtype, generation ids and card metadata.
VARIANTS = {
    "memoryllm-8b": {
        "config": {**LLAMA_3_8B, "eos_token_id": 128001},
        "rope": {"rope_type": "linear", "factor": 1.8125, "rope_theta": 500000.0},
        "generation": {"bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128001},
        "license": "llama3",
        "base_model": "meta-llama/Meta-Llama-3-8B",
    },
    "memoryllm-8b-chat": {
        "config": {**LLAMA_3_8B, "eos_token_id": 128009},
        "rope": {"rope_type": "linear", "factor": 1.8125, "rope_theta": 500000.0},
        "generation": {"bos_token_id": 128000, "eos_token_id": [128001, 128009], "pad_token_id": 128009},
        "license": "llama3",
        "base_model": "meta-llama/Meta-Llama-3-8B-Instruct",
    },
    "memoryllm-7b": {
        "config": {
            **LLAMA_2_7B,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "num_tokens": 256,
            "num_blocks": 30,
            "add_bos_embedding": True,
            "interpolate_position_ids": True,
            "lora_config": None,
            "max_inject_length": 512,
            "memory_variant": "memoryllm-7b",
        },
        # position interpolation as linear scaling: (num_blocks + 1) * num_tokens / max_position_embeddings
        "rope": {"rope_type": "linear", "factor": (30 + 1) * 256 / 4096, "rope_theta": 10000.0},
        "dtype": torch.float32,  # as released
        "generation": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
        "license": "llama2",
        "base_model": "meta-llama/Llama-2-7b-hf",
    },
    "mplus-8b": {
        "config": {
            **{k: v for k, v in LLAMA_3_8B.items() if k != "max_position_embeddings"},
            "max_position_embeddings": 131072,
            "eos_token_id": [128001, 128008, 128009],
            "memory_variant": "mplus",
            "num_ltm_blocks": 10,
            "selector_hidden_dim": 256,
            "num_selector_layers": 2,
            "ltm_initial_size": 0,
            "update_ltm_frequency": 60,
            "decay_frequency": 1,
            "initial_rf_when_moving_stm_to_ltm": 10,
        },
        "rope": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        "generation": {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128001},
        "license": "llama3.1",
        "base_model": "meta-llama/Llama-3.1-8B",
    },
    "smollm2-135m-memoryllm": {
        "config": {
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "tie_word_embeddings": True,
            "num_tokens": 256,
            "num_blocks": 8,
            "add_bos_embedding": True,
            "drop_memory_per_layer": False,
            "add_decoder_lora": True,
            "lora_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": LORA_TARGETS},
            "max_inject_length": 256,
            "memory_variant": "training-free-ranked",
            "memory_read": "relevant",
            "read_chunks": 1,
            "archive_rows": 8192,
            "read_match": "folded",
            "memory_drop": "random",
            "text_context": "own",
            "attention_score": "mean",
            "attention_window": 32,
            "attention_pool": 1,
        },
        "rope": {"rope_type": "default", "rope_theta": 100000.0},
        "generation": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
        "license": "apache-2.0",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}
NAMES = sorted(VARIANTS)


def folder(name: str) -> pathlib.Path:
    return HUB_CONFIGS / name


def memory_rows(spec: dict) -> int:
    """M: rows read whole (M+: the short-term memory, `num_blocks - num_ltm_blocks` blocks)."""
    return spec["num_tokens"] * (spec["num_blocks"] - spec.get("num_ltm_blocks", 0))


def memory_values(spec: dict) -> int:
    """L * M * d: the values in one memory."""
    return spec["num_hidden_layers"] * memory_rows(spec) * spec["hidden_size"]


def retriever_parameters(spec: dict) -> int:
    """M+: query, key and encoder-query projectors (d -> 2s -> s) per layer, and the LTM parameters."""
    if "num_ltm_blocks" not in spec:
        return 0
    d, width, layers = spec["hidden_size"], spec["selector_hidden_dim"], spec["num_hidden_layers"]
    ltm = spec["ltm_initial_size"] * (d + width + 2)
    return layers * (3 * (d * 2 * width + 2 * width * width) + ltm)


def llama_parameters(spec: dict) -> int:
    """Parameters of the plain Llama with these numbers (GQA attention, SwiGLU MLP, RMSNorms, optional lm_head)."""
    d, inter, vocab = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    kv_width = spec["num_key_value_heads"] * (d // spec["num_attention_heads"])
    attention = d * d + 2 * d * kv_width + d * d  # q, k, v, o
    mlp = 3 * d * inter  # gate, up, down
    layer = attention + mlp + 2 * d  # input and post-attention norms
    lm_head = 0 if spec["tie_word_embeddings"] else vocab * d
    return vocab * d + spec["num_hidden_layers"] * layer + d + lm_head


def lora_parameters(spec: dict) -> int:
    """r * (in + out) per target projection, per adapter, per layer (none without `lora_config`)."""
    if spec.get("lora_config") is None:
        return 0
    d, inter, rank = spec["hidden_size"], spec["intermediate_size"], spec["lora_config"]["r"]
    kv_width = spec["num_key_value_heads"] * (d // spec["num_attention_heads"])
    shapes = {
        "q_proj": (d, d),
        "k_proj": (d, kv_width),
        "v_proj": (d, kv_width),
        "o_proj": (d, d),
        "gate_proj": (d, inter),
        "up_proj": (d, inter),
        "down_proj": (inter, d),
    }
    per_adapter = sum(rank * sum(shapes[t]) for t in spec["lora_config"]["target_modules"])
    adapters = 2 if spec.get("add_decoder_lora", True) else 1
    return per_adapter * adapters * spec["num_hidden_layers"]


def memory_parameters(spec: dict) -> int:
    """The memory (L * M * d), the per-layer bos rows (L * d) and the positional vector e (d)."""
    bos = spec["num_hidden_layers"] * spec["hidden_size"] if spec["add_bos_embedding"] else 0
    return memory_values(spec) + bos + spec["hidden_size"]


def check_config(config, name: str) -> None:
    expected = VARIANTS[name]
    assert isinstance(config, MemoryLLMConfig)
    assert config.model_type == "memoryllm"
    for key, value in expected["config"].items():
        assert getattr(config, key) == value, key
    spec = expected["config"]
    assert config.memory_rows == memory_rows(spec)
    assert config.head_dim == spec["hidden_size"] // spec["num_attention_heads"]
    assert config.dtype == expected.get("dtype", torch.bfloat16)
    assert config.architectures == ["MemoryLLMForCausalLM"]
    assert config.auto_map == AUTO_MAP
    rope = {key: config.rope_parameters.get(key) for key in expected["rope"]}
    assert rope == expected["rope"]


def test_every_variant_folder_is_complete():
    assert sorted(p.name for p in HUB_CONFIGS.iterdir() if p.is_dir()) == NAMES
    for name in NAMES:
        for file in ("config.json", "generation_config.json", "README.md"):
            assert (folder(name) / file).is_file(), f"{name}/{file}"


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_as_memoryllm_config(name):
    check_config(MemoryLLMConfig.from_pretrained(folder(name)), name)


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_through_auto_config(name):
    config = AutoConfig.from_pretrained(folder(name))
    assert type(config) is MemoryLLMConfig
    check_config(config, name)


@pytest.mark.parametrize("name", ["memoryllm-8b", "memoryllm-8b-chat"])
def test_8b_config_keeps_the_released_rope_style(name):
    raw = json.loads((folder(name) / "config.json").read_text())
    assert raw["rope_scaling"] == {"type": "linear", "factor": 1.8125}
    assert raw["rope_theta"] == 500000.0
    assert "rope_parameters" not in raw
    assert "num_memory_tokens" not in raw  # derived (num_tokens * num_blocks): not stored


@pytest.mark.parametrize("name", NAMES)
def test_generation_config(name):
    generation = GenerationConfig.from_pretrained(folder(name))
    for key, value in VARIANTS[name]["generation"].items():
        assert getattr(generation, key) == value, key
    assert generation.do_sample is False
    assert generation.max_new_tokens == 64


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_on_meta_device(name):
    spec = VARIANTS[name]["config"]
    config = MemoryLLMConfig.from_pretrained(folder(name))
    with torch.device("meta"):
        model = MemoryLLMForCausalLM(config)
    params = dict(model.named_parameters())  # tied weights appear once
    lora = sum(p.numel() for n, p in params.items() if ".lora_A." in n or ".lora_B." in n)
    memory = sum(p.numel() for n, p in params.items() if n in ("memory", "bos_embedding", "new_memory_positional_emb"))
    retriever = sum(p.numel() for n, p in params.items() if "query_proj." in n or "key_proj." in n)
    retriever += sum(p.numel() for n, p in params.items() if n.startswith(("ltm.", "ltm_")))
    llama = sum(p.numel() for p in params.values()) - lora - memory - retriever

    assert model.memory.shape == (spec["num_hidden_layers"], config.memory_rows, spec["hidden_size"])
    assert model.bos_embedding.shape == (spec["num_hidden_layers"], 1, spec["hidden_size"])
    assert lora == lora_parameters(spec) and (lora > 0) == (spec["lora_config"] is not None)
    assert memory == memory_parameters(spec)
    assert llama == llama_parameters(spec) and retriever == retriever_parameters(spec)
    total = llama_parameters(spec) + lora_parameters(spec) + memory_parameters(spec) + retriever_parameters(spec)
    assert sum(p.numel() for p in params.values()) == total


def test_llama_formula_gives_llama_3_8b():
    assert llama_parameters(LLAMA_3_8B) == 8_030_261_248


def test_llama_formula_gives_llama_2_7b():
    assert llama_parameters(LLAMA_2_7B) == 6_738_415_616


def test_7b_config_keeps_the_released_keys():
    """RoPE in the released style (interpolation, no `rope_scaling`, base 10000), no adapters, and the never-read
    keys with the values of the released layout (golden C's `config.json` was made from it)."""
    raw = json.loads((folder("memoryllm-7b") / "config.json").read_text())
    released = json.loads((GOLDEN_C / "checkpoint" / "config.json").read_text())
    assert raw["interpolate_position_ids"] is True and raw["rope_scaling"] is None and raw["rope_theta"] == 10000.0
    assert "rope_parameters" not in raw and "lora_config" not in raw and "num_memory_tokens" not in raw
    for key in NEVER_READ_7B:
        assert raw[key] == released[key], key
    assert set(released) - set(raw) <= {"torch_dtype", "transformers_version"}  # transformers 5 names: dtype


def test_7b_config_without_variant_name_is_recognised():
    raw = json.loads((folder("memoryllm-7b") / "config.json").read_text())
    raw.pop("memory_variant")
    config = MemoryLLMConfig.from_dict({**raw, "rope_theta": 5e5})  # the base is 10000 whatever the config says
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.memory_variant == "memoryllm-7b"
    span = (raw["num_blocks"] + 1) * raw["num_tokens"]
    assert config.rope_parameters["factor"] == span / raw["max_position_embeddings"] == 1.9375
    assert not config.variant.drops_per_layer(config) and config.adapter_names == ()


@pytest.mark.parametrize("name", NAMES)
def test_model_card_parses(name):
    path = folder(name) / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["license"] == VARIANTS[name]["license"]
    assert data["base_model"] == VARIANTS[name]["base_model"]
    assert data["pipeline_tag"] == "text-generation"
    assert data["library_name"] == "transformers"
    assert {"memoryllm", "llama", "custom_code"} <= set(data["tags"])
    assert "datasets" in data


@pytest.mark.parametrize("name", NAMES)
def test_model_card_body(name):
    spec = VARIANTS[name]["config"]
    text = ModelCard.load(folder(name) / "README.md").text
    for needle in (
        "arXiv:2402.04624",
        "trust_remote_code=True",
        "model.inject(",
        "model.new_memory_state()",
        "memory=state",
        'state.save("m.safetensors")',
        "@inproceedings{wang2024memoryllm",
        f"python -m eval card RESULTS.json --card hub_configs/{name}/README.md",
        f"{memory_values(spec):,}",
        f"{memory_values(spec) * 2:,}",  # bfloat16 / float16
        f"{memory_values(spec) * 4:,}",  # float32
        f"{llama_parameters(spec) + lora_parameters(spec) + memory_parameters(spec) + retriever_parameters(spec):,}",
    ):
        assert needle in text, needle


def test_default_card_states_the_training_free_mode():
    text = ModelCard.load(folder("smollm2-135m-memoryllm") / "README.md").text
    assert "training-free memory mode" in text
    assert '`memory_variant:\n> "training-free-ranked"`' in text and '`memory_drop: "random"`' in text
    assert "Inject with the chat framing" in text
    assert "**input** hidden states" in text
    assert "compressed KV cache" in text
    assert "adapters are untrained" in text


def test_7b_card_states_the_variant_and_the_deliberate_differences():
    text = ModelCard.load(folder("memoryllm-7b") / "README.md").text
    for needle in (
        '`memory_variant: "memoryllm-7b"`',
        "linear RoPE scaling with factor",
        "**1.9375**",
        "No adapters.",
        "One shared drop.",
        "No `e` at the first injection.",
        "GQA runs",
        '`attn_implementation="sdpa"` is refused',
        "a mask covers the text only",
        "`generate` works without a mask and without bos",
        "4,026,531,840 (4.03 GB, 3.75 GiB)",
        "see the paper's experiments section",
    ):
        assert needle in text, needle


def test_default_folder_config_is_the_embedded_defaults_memory():
    """The published config of the default and the default that `load_default()` builds read the same memory rule."""
    from modeling_memoryllm.default import DEFAULT_MEMORY
    from modeling_memoryllm.variant_ranked import DEFAULT_OPTIONS

    published = json.loads((folder("smollm2-135m-memoryllm") / "config.json").read_text())
    embedded = {**DEFAULT_OPTIONS, **DEFAULT_MEMORY}
    assert {key: published.get(key) for key in embedded} == embedded
