"""Released folders as they are: a MemoryLLM-8B config with `model_type: "llama"` (the Hub release) and an M+ folder
load through the package's entry points with their memory; a plain `AutoModelForCausalLM` falls into the trap and
`from_backbone` says so; `memoryllm convert` handles M+."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from modeling_memoryllm import MemoryLLMForCausalLM, MemoryState, cli, hub, serving
from tests.conftest import assert_close, golden_path, run_offline_script


@pytest.fixture(scope="module")
def released_8b(tmp_path_factory):
    """Golden A with the Hub release's config header: model_type llama, architectures MemoryLLM, no auto_map."""
    folder = tmp_path_factory.mktemp("released_8b")
    shutil.copytree(golden_path("A") / "checkpoint", folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["MemoryLLM"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@torch.no_grad()
def test_released_8b_folder_loads_with_its_memory(released_8b, fixtures):
    for model in (hub.load_released(str(released_8b)), serving.load_model(str(released_8b))):
        assert model.config.memory_variant == "memoryllm-8b"
        assert_close(model.memory, fixtures["input.memory_M0"], tol=0)
        assert_close(model.eval()(fixtures["input.query_d"]).logits, fixtures["d.logits"])


def test_plain_auto_model_is_the_trap_and_from_backbone_warns(released_8b, caplog):
    plain = AutoModelForCausalLM.from_pretrained(released_8b)
    assert type(plain) is LlamaForCausalLM  # the memory is gone: what the package's entry points avoid
    with caplog.at_level(logging.WARNING):
        MemoryLLMForCausalLM.from_backbone(plain, num_tokens=4, num_blocks=2, lora_config=None)
    assert "released MemoryLLM checkpoint loaded as a plain Llama" in caplog.text


def test_short_names_resolve_to_the_released_repositories(tmp_path):
    assert hub.resolve("memoryllm-8b") == ("YuWangX/memoryllm-8b", None)
    assert hub.resolve("mplus-8b")[0] == "YuWangX/mplus-8b" and hub.resolve("memoryllm-7b")[0] == "YuWangX/memoryllm-7b"
    assert hub.resolve(str(tmp_path)) == (str(tmp_path), None)  # a folder is itself
    assert hub.resolve("someone/other") == ("someone/other", None)


@torch.no_grad()
def test_mplus_ltm_size_comes_from_the_checkpoint(tmp_path):
    folder = tmp_path / "mplus"
    shutil.copytree(golden_path("E") / "checkpoint", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ltm_initial_size": 7}))  # a stale size
    model = hub.load_released(str(folder))
    assert model.config.ltm_initial_size == 20 and model.memory_state.ltm_rows == [20, 20, 20]


@torch.no_grad()
def test_convert_mplus_then_reload(tmp_path):
    fx = load_file(golden_path("E") / "fixtures.safetensors")
    out = tmp_path / "hub"
    assert cli.main(["convert", str(golden_path("E") / "checkpoint"), str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "memoryllm" and saved["memory_variant"] == "mplus" and "auto_map" in saved
    model = MemoryLLMForCausalLM.from_pretrained(out).eval()
    state = model.memory_state.clone()
    state.stm_ages = fx["input.stm_ages0"].double()
    assert_close(model(fx["input.query_d"], memory=state).logits, fx["d.logits"])
    script = """
import sys, json, torch
sys.modules["modeling_memoryllm"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({"variant": model.config.memory_variant, "ltm": model.memory_state.ltm_rows}))
"""
    result = run_offline_script(script, str(out), cwd=tmp_path)
    assert result == {"variant": "mplus", "ltm": [20, 20, 20]}


def test_an_8b_memory_is_refused_by_an_mplus_model():
    model = hub.load_released(str(golden_path("E") / "checkpoint"))
    plain = MemoryState(torch.zeros(3, 32, 64), initialized=True)
    with pytest.raises(ValueError, match="reads a MPlusMemoryState"):
        model(torch.tensor([[5, 6, 7]]), memory=plain)


def test_mplus_refuses_an_update_mode_it_does_not_have():
    config = json.loads((golden_path("E") / "checkpoint" / "config.json").read_text())
    from modeling_memoryllm import MemoryLLMConfig

    assert MemoryLLMConfig(**config).memory_variant == "mplus"
    with pytest.raises(ValueError, match="immediate"):
        MemoryLLMConfig(**{**config, "update_ltm_mode": "decouple"})
