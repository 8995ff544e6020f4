"""Shared fixtures: the golden checkpoint A in the released layout, and its reference numbers."""

import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file


ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("MEMORYLLM_SHARED", ROOT.parent / "shared"))
GOLDEN_A = SHARED / "golden" / "A"
if not GOLDEN_A.exists():
    GOLDEN_A = ROOT / "tests" / "data" / "golden_A"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN_A


@pytest.fixture(scope="session")
def fixtures() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN_A / "fixtures.safetensors")


def load_golden(attn_implementation: str = "sdpa", dtype=torch.float32):
    from modeling_memoryllm import MemoryLLMForCausalLM

    model = MemoryLLMForCausalLM.from_pretrained(
        GOLDEN_A / "checkpoint", attn_implementation=attn_implementation, dtype=dtype
    )
    return model.eval()


@pytest.fixture(scope="session")
def saved_folder(tmp_path_factory) -> pathlib.Path:
    """Golden A written by `save_pretrained`: a Hub-ready folder with `auto_map` and the remote-code files.
    Shared by the test files: treat it as read-only."""
    folder = tmp_path_factory.mktemp("saved_golden")
    load_golden().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def golden_model():
    return load_golden()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)
