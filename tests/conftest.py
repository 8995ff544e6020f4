"""Shared fixtures: the golden checkpoint A in the released layout, and its reference numbers."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("MEMORYLLM_SHARED", ROOT.parent / "shared"))
os.environ.setdefault("MEMORYLLM_HUB_CONFIGS", str(ROOT / "hub_configs"))  # eval's default is ./hub_configs


def golden_path(name: str) -> pathlib.Path:
    """Golden set `name` ("A", "C", "E", ...): `$MEMORYLLM_SHARED/golden/<name>` when present, else the vendored
    copy `tests/data/golden_<name>`."""
    shared = SHARED / "golden" / name
    return shared if shared.exists() else ROOT / "tests" / "data" / f"golden_{name}"


GOLDEN_A = golden_path("A")

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny tensors
    are not worth sharing out, and on a shared 2-core CI machine two OpenMP threads mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def run_offline_script(script: str, *args: str, cwd: pathlib.Path, unset: tuple[str, ...] = (), **env: str) -> dict:
    """Runs `script` in a fresh Python process (`sys.argv[1:]` = `args`) in `cwd`, offline (HF_HUB_OFFLINE, remote
    code cached under `cwd/modules`), with `env` added and the variables in `unset` removed. It must exit 0; returns
    the JSON object it printed last."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"), **env)
    for name in unset:
        environment.pop(name, None)
    completed = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=environment, cwd=cwd, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])
