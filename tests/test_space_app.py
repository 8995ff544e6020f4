"""The Space (`spaces_app/app.py`, package `memoryllm_space`) through `gradio_client`, against golden A served on
127.0.0.1."""

import pathlib
import re
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_memoryllm import MemoryState
from modeling_memoryllm.serving import memory_stats
from tests.conftest import run_offline_script
from tests.test_serving import known_state
from tests.test_space_support import ROOT, expected_answer, golden_with_tokenizer, load_fresh, running_app


gradio_client = pytest.importorskip("gradio_client")
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas use
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from memoryllm_space import gpu  # noqa: E402
from memoryllm_space.handlers import MemorySpace  # noqa: E402
from memoryllm_space.sessions import SessionStore, session_generator  # noqa: E402
from memoryllm_space.settings import Settings  # noqa: E402
from memoryllm_space.views import memory_view, provenance_rows, stats_markdown  # noqa: E402


TEXT_A = "Marta keeps three blue herons in a glass barn on the hill above Lindow; she feeds them at dawn."
TEXT_B = "The ferry Kestrel leaves Port Abbey at noon and carries sixty bicycles across the grey channel."
QUESTION = "Where are the herons kept?"
LIMITS = dict(max_new_tokens=8, max_inject_chars=2000, max_question_chars=200)


@pytest.fixture(scope="module")
def golden():
    return golden_with_tokenizer()


@pytest.fixture(scope="module")
def served(golden):
    with running_app(golden, **LIMITS) as (url, demo):
        yield url, demo


@pytest.fixture(scope="module")
def url(served):
    return served[0]


def new_client(url: str) -> Client:
    return Client(url, verbose=False)  # every client is a session of its own


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def ask(client: Client, question: str = QUESTION, compare: bool = False) -> tuple[str, str | None]:
    history, plain, cleared = client.predict(question, compare, [], [], api_name="/ask")
    assert cleared == ""
    return text_of(history[-1]), (text_of(plain[-1]) if plain else None)


def injections(stats: str) -> int:
    return int(re.search(r"Injections absorbed:\*\* (\d+)", stats).group(1))


def memory_file(client: Client) -> dict[str, torch.Tensor]:
    path = client.predict(api_name="/download_memory")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    return {**load_file(path), "injections": int(metadata["injections"])}


def test_inject_then_ask_with_comparison(golden, url):
    client = new_client(url)
    status, stats, chart = client.predict(TEXT_A, api_name="/inject")
    assert "<svg" in chart and ">#1</text>" in chart
    assert status.startswith(f"Injected {len(TEXT_A)} characters") and "1 chunk of" in status
    assert injections(stats) == 1 and "bfloat16" in stats
    with_memory, without = ask(client, compare=True)
    assert with_memory == expected_answer(golden, [TEXT_A], QUESTION, LIMITS["max_new_tokens"])
    assert without == expected_answer(golden, [], QUESTION, LIMITS["max_new_tokens"])
    assert with_memory != without


def test_two_sessions_at_once_answer_from_their_own_memory(golden, url):
    def session(text: str) -> tuple[int, str]:
        client = new_client(url)
        _, stats, _ = client.predict(text, api_name="/inject")
        return injections(stats), ask(client)[0]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(session, [TEXT_A, TEXT_B]))
    expected = [expected_answer(golden, [text], QUESTION, LIMITS["max_new_tokens"]) for text in (TEXT_A, TEXT_B)]
    assert expected[0] != expected[1]  # the check can tell the memories apart
    assert results == [(1, expected[0]), (1, expected[1])]


def test_bad_inputs_are_refused_and_leave_the_memory_unchanged(url, tmp_path):
    client = new_client(url)
    client.predict(TEXT_A, api_name="/inject")
    before = memory_file(client)
    for text, message in [("", "Nothing to inject"), ("  \n ", "Nothing to inject"), ("x" * 2001, "at most 2,000")]:
        with pytest.raises(AppError, match=message):
            client.predict(text, api_name="/inject")
    for question, message in [("", "Type a question"), ("?" * 201, "the limit is 200")]:
        with pytest.raises(AppError, match=message):
            client.predict(question, False, [], [], api_name="/ask")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    other_shape = tmp_path / "other.safetensors"
    MemoryState(torch.zeros(2, 4, 8)).save(other_shape)  # a memory for another model
    not_memory = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, not_memory)
    for path, message in [
        (garbage, "not a readable safetensors"),
        (other_shape, "does not fit this model"),
        (not_memory, "not a MemoryLLM memory"),
    ]:
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(path)), api_name="/upload_memory")
    after = memory_file(client)
    assert after["injections"] == before["injections"] == 1
    assert torch.equal(after["memory"], before["memory"]) and torch.equal(after["provenance"], before["provenance"])


def test_reset_empties_the_memory(golden, url):
    client = new_client(url)
    client.predict(TEXT_A, api_name="/inject")
    status, stats, _ = client.predict(api_name="/reset")
    assert "reset" in status and injections(stats) == 0 and "none yet" in stats
    assert ask(client)[0] == expected_answer(golden, [], QUESTION, LIMITS["max_new_tokens"])


def test_download_then_upload_restores_the_memory(url):
    first = new_client(url)
    first.predict(TEXT_A, api_name="/inject")
    first.predict(TEXT_B, api_name="/inject")
    path = first.predict(api_name="/download_memory")
    second = new_client(url)
    status, stats, _ = second.predict(handle_file(path), api_name="/upload_memory")
    assert "2 injections" in status and injections(stats) == 2
    saved, restored = memory_file(first), memory_file(second)
    assert torch.equal(saved["memory"], restored["memory"]) and torch.equal(saved["provenance"], restored["provenance"])
    assert ask(second) == ask(first)


def test_text_files_examples_and_long_text(url, tmp_path):
    client = new_client(url)
    note = tmp_path / "note.md"
    note.write_text("# Notes\nThe herons are fed at dawn.\n", encoding="utf-8")
    assert client.predict(handle_file(str(note)), api_name="/load_file") == note.read_text(encoding="utf-8")
    (tmp_path / "big.txt").write_text("y" * 2001, encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    for name, message in [("big.txt", "at most 2,000"), ("latin1.txt", "not UTF-8")]:
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(tmp_path / name)), api_name="/load_file")
    text, question, hint = client.predict("Varden Island lighthouse (fiction)", api_name="/example")
    assert text.startswith("The lighthouse on Varden Island") and "first keeper" in question and question in hint
    status, stats, _ = client.predict("z" * 1100, api_name="/inject")  # golden A injects 512 tokens at a time
    assert "3 chunks" in status and injections(stats) == 3


def test_model_work_is_bounded_by_the_queue(served):
    _, demo = served
    by_name = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    for name in ("inject", "ask"):
        assert by_name[name].concurrency_id == "model" and by_name[name].concurrency_limit == 2
    assert demo._queue.max_size == 32


def test_gpu_work_goes_through_spaces_gpu_when_the_package_exists(monkeypatch):
    wrapped = []

    def fake_gpu(duration):
        def decorate(fn):
            wrapped.append((fn.__name__, duration))
            return fn

        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    zerogpu = load_fresh("memoryllm_space.gpu", "gpu_zerogpu")
    assert zerogpu.spaces is sys.modules["spaces"]
    assert sorted(name for name, _ in wrapped) == ["answer_stream", "injection_steps"]
    assert gpu.spaces is None  # without the package: plain functions


def test_session_store_drops_idle_and_least_recent_sessions():
    now, dropped = [0.0], []
    store = SessionStore(
        lambda: MemoryState(torch.zeros(1, 1, 1)),
        ttl=10,
        max_sessions=2,
        on_drop=dropped.append,
        clock=lambda: now[0],
    )
    store.get("a")
    now[0] = 5
    store.get("b")
    store.get("c")  # over max_sessions: "a" (least recent) goes
    assert dropped == ["a"] and "a" not in store and len(store) == 2
    now[0] = 30
    store.sweep()  # "b" and "c" were idle for 25 s > ttl
    assert len(store) == 0 and dropped == ["a", "b", "c"]
    assert "too many" in store.get("a").notice  # a returning visitor is told why
    assert "without activity" in store.get("b").notice and store.get("z").notice is None


def test_byte_tokenizer_decodes_one_id_like_a_list(golden):
    tokenizer = golden.tokenizer
    assert tokenizer.decode(ord("a") + 3) == tokenizer.decode([ord("a") + 3]) == "a"
    assert tokenizer.decode(torch.tensor(ord("b") + 3)) == "b" and tokenizer.decode(511) == "[511]"


def test_each_session_draws_its_drops_from_its_own_generator(golden):
    """Golden A drops random rows at every injection. A session's memory must depend on its own injections only:
    interleaving another session's injections changes nothing, and equals a fresh memory injected with the
    session's generator."""
    space = MemorySpace(golden, Settings(seed=1234, memory_dtype="float32"))
    texts_a, texts_b = [TEXT_A, TEXT_B[::-1]], [TEXT_B, TEXT_A[::-1]]
    for text_a, text_b in zip(texts_a, texts_b):
        space.inject(text_a, types.SimpleNamespace(session_hash="a"), progress=lambda *args, **kwargs: None)
        space.inject(text_b, types.SimpleNamespace(session_hash="b"), progress=lambda *args, **kwargs: None)

    def alone(texts, generator):
        state = golden.new_memory_state(dtype=torch.float32)
        for text in texts:
            golden.inject(
                golden.tokenizer(text, add_special_tokens=False)["input_ids"], memory=state, generator=generator
            )
        return state.memory

    assert torch.equal(space.store.get("a").state.memory, alone(texts_a, session_generator(1234, "a")))
    assert torch.equal(space.store.get("b").state.memory, alone(texts_b, session_generator(1234, "b")))
    # the drops do depend on the generator, so the equalities above could fail
    assert not torch.equal(alone(texts_a, session_generator(1234, "a")), alone(texts_a, torch.Generator()))
    assert session_generator(1234, "a").initial_seed() != session_generator(4321, "a").initial_seed()


def test_settings_from_environment():
    env = {"MEMORYLLM_MAX_SESSIONS": "3", "MEMORYLLM_SESSION_TTL": "60", "MEMORYLLM_MEMORY_DTYPE": "float32"}
    settings = Settings.from_env(env | {"MEMORYLLM_SEED": "7"})
    assert (settings.max_sessions, settings.session_ttl, settings.memory_dtype) == (3, 60.0, "float32")
    assert settings.seed == 7 and Settings.from_env(env).seed is None
    assert settings.model is None and settings.max_inject_chars == 20_000
    with pytest.raises(ValueError, match="MEMORYLLM_DTYPE"):
        Settings.from_env({"MEMORYLLM_DTYPE": "int8"})


def test_memory_views_of_a_known_state():
    stats = memory_stats(known_state())
    assert stats_markdown(stats) == (
        "**2 layers × 4 rows** of width 8 (0.000256 MB, float32)  \n"
        "**Injections absorbed:** 2 · **rows written:** 3 of 4 per layer  \n"
        "**Rows per layer by injection:** #1: 1.5, #2: 1"
    )
    assert provenance_rows(stats) == [
        ("empty", 1.0, "never written"),
        ("initial", 0.5, "initial"),
        ("#1", 1.5, "injection"),
        ("#2", 1.0, "injection"),
    ]
    markdown, chart = memory_view(known_state())
    assert markdown == stats_markdown(stats) and chart.count("<rect") == 4 and "<title>#1: 1.5 rows</title>" in chart


def test_space_files_and_bundle(tmp_path):
    readme = (ROOT / "spaces_app" / "README.md").read_text(encoding="utf-8")
    header = readme.split("---")[1]
    for line in ("sdk: gradio", "app_file: app.py", "license: apache-2.0", "models:"):
        assert line in header
    requirements = (ROOT / "spaces_app" / "requirements.txt").read_text(encoding="utf-8")
    assert "gradio" in requirements and "transformers" in requirements
    out = tmp_path / "space"
    subprocess.run([sys.executable, str(ROOT / "spaces_app" / "make_space.py"), str(out)], check=True)
    for name in ("app.py", "README.md", "requirements.txt", "examples/halloran_glassworks.txt"):
        assert (out / name).is_file()
    assert (out / "modeling_memoryllm" / "modeling_memoryllm.py").is_file()
    assert (out / "modeling_memoryllm" / "data" / "varden_lighthouse.txt").is_file()
    assert not list(out.rglob("__pycache__"))
    # the folder runs on its own: app.py imports the Space's package and modeling_memoryllm from beside it
    check = (
        "import json, app, memoryllm_space.layout, memoryllm_space.handlers as h, modeling_memoryllm\n"
        "examples = [str(path) for path, _ in h.EXAMPLES.values()]\n"
        "files = [memoryllm_space.layout.__file__, modeling_memoryllm.__file__, *examples]\n"
        "print(json.dumps({'main': callable(app.main), 'files': files}))"
    )
    found = run_offline_script(check, cwd=out)
    assert found["main"] and len(found["files"]) == 5
    assert all(pathlib.Path(path).resolve().is_relative_to(out.resolve()) for path in found["files"]), found
    for path in found["files"][2:]:
        assert pathlib.Path(path).is_file()
