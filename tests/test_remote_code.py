"""`save_pretrained` writes a folder that loads with `trust_remote_code=True` where the package is not importable."""

import ast
import json
import sys

import pytest
import torch

from tests.conftest import run_offline_script


REMOTE_CHECK = r"""
import sys
sys.modules["modeling_memoryllm"] = None  # the package itself must not be importable
import json, torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM
folder, fixtures_path = sys.argv[1], sys.argv[2]
fixtures = load_file(fixtures_path)
results = {}
for auto in (AutoModelForCausalLM, AutoModel):
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(fixtures["input.query_d"]).logits
        results[auto.__name__] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "d_error": float((logits - fixtures["d.logits"]).abs().max()),
        }
        model.inject(fixtures["input.ctx_b"])
        results[auto.__name__]["generated"] = model.generate(fixtures["input.prompt_e"], max_new_tokens=3).shape[1]
print(json.dumps(results))
"""


def test_saved_folder_layout(saved_folder):
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["model_type"] == "memoryllm"
    assert config["auto_map"]["AutoModel"] == "modeling_memoryllm.MemoryLLMForCausalLM"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_memoryllm.MemoryLLMForCausalLM"
    assert "num_memory_tokens" not in config  # derived numbers are not stored
    assert (saved_folder / "model.safetensors").exists()
    for name in ("configuration_memoryllm.py", "modeling_memoryllm.py", "memory_state.py", "cache_memoryllm.py"):
        assert (saved_folder / name).exists(), name


def test_remote_code_files_import_only_allowed_modules(saved_folder):
    allowed = {"torch", "transformers", "safetensors"}
    stdlib = set(sys.stdlib_module_names)
    for path in saved_folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name}: only single-dot relative imports"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top in allowed or top in stdlib, f"{path.name} imports {name}"


def test_fresh_process_loads_with_trust_remote_code(saved_folder, golden_dir, tmp_path):
    fixtures = str(golden_dir / "fixtures.safetensors")
    results = run_offline_script(REMOTE_CHECK, str(saved_folder), fixtures, cwd=tmp_path)
    for auto_name in ("AutoModelForCausalLM", "AutoModel"):
        result = results[auto_name]
        assert result["class"] == "MemoryLLMForCausalLM"
        assert result["module"].startswith("transformers_modules")
        assert result["d_error"] < 1e-4
        assert result["generated"] == 8


@torch.no_grad()
def test_bfloat16_round_trip(saved_folder):
    from modeling_memoryllm import MemoryLLMForCausalLM

    model = MemoryLLMForCausalLM.from_pretrained(saved_folder, dtype=torch.bfloat16)
    assert model.memory.dtype == torch.bfloat16
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@torch.no_grad()
def test_device_map_places_the_model(golden_dir, fixtures):
    pytest.importorskip("accelerate")
    from modeling_memoryllm import MemoryLLMForCausalLM

    model = MemoryLLMForCausalLM.from_pretrained(golden_dir / "checkpoint", device_map="cpu").eval()
    assert model.device.type == "cpu"
    logits = model(fixtures["input.query_d"]).logits
    torch.testing.assert_close(logits, fixtures["d.logits"], atol=1e-4, rtol=1e-4)


def test_fresh_process_trust_remote_code_reproduces_every_fixture_of_a(saved_folder, golden_dir, tmp_path):
    """The same every-fixture check as golden C's (a, a2, h, b, c, d with its cache, e, f, g; sdpa and eager)."""
    from tests.test_golden_7b import REMOTE_CHECK

    results = run_offline_script(
        REMOTE_CHECK, str(saved_folder), str(golden_dir / "fixtures.safetensors"), cwd=tmp_path
    )
    assert sorted(results) == ["eager", "sdpa"]
    for backend, result in results.items():
        assert result.pop("module").startswith("transformers_modules"), backend
        assert result.pop("variant") == "memoryllm-8b", backend
        assert result.pop("e.sequences_equal"), backend
        failing = {name: value for name, value in result.items() if not value < 1}  # in units of the 1e-4 tolerance
        assert not failing and len(result) == 15, (backend, failing)
