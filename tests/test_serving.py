"""The serving layer shared by the CLI and the Space (`modeling_memoryllm/serving.py`), on golden A."""

import types

import pytest
import torch

from modeling_memoryllm import MemoryState, serving
from modeling_memoryllm.cli import stats_line
from tests.conftest import GOLDEN_A
from tests.test_space_support import golden_with_tokenizer


TEXT = "Marta keeps three blue herons in a glass barn on the hill above Lindow; she feeds them at dawn."
QUESTION = "Where are the herons kept?"


@pytest.fixture(scope="module")
def golden():
    return golden_with_tokenizer()


@pytest.fixture(scope="module")
def injected(golden):
    state = golden.new_memory_state()
    golden.inject(TEXT, memory=state, show_progress=False)
    return state


def known_state() -> MemoryState:
    """2 layers x 4 rows: a never-written row, an initial row in layer 0 only, injections #1 and #2."""
    provenance = torch.tensor([[-1, 0, 1, 2], [-1, 1, 1, 2]])
    return MemoryState(torch.zeros(2, 4, 8), initialized=True, provenance=provenance, injections=2)


def reference_answer(model, state, question: str, max_new_tokens: int) -> tuple[str, bool]:
    """Greedy decoding of the paper's prompt by hand (golden A's byte tokenizer has no chat template): the text as
    it came, and whether it ran to the token limit."""
    tokenizer = model.tokenizer
    prompt = tokenizer(f"Questions: {question} Answer:", return_tensors="pt")
    memory = state if state is not None else model.new_memory_state()
    with torch.no_grad():
        output = model.generate(
            prompt.input_ids, attention_mask=prompt.attention_mask, memory=memory, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    new = output[0, prompt.input_ids.shape[1] :]
    cut = len(new) == max_new_tokens and tokenizer.eos_token_id not in new.tolist()
    return tokenizer.decode(new, skip_special_tokens=True).strip(), cut


@pytest.mark.parametrize(
    ("pad", "eos", "expected"), [(0, 7, 0), (None, 7, 7), (None, 0, 0), (5, None, 5), (None, None, 0)]
)
def test_pad_token_id_keeps_an_id_of_zero(pad, eos, expected):
    assert serving.pad_token_id(types.SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected


def test_resolve_dtype():
    assert serving.resolve_dtype("bfloat16") is torch.bfloat16 and serving.resolve_dtype("float16") is torch.float16
    assert serving.resolve_dtype(None) is torch.float32 and serving.resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        serving.resolve_dtype("int8")


def test_chat_prompt_without_and_with_a_template(golden):
    assert serving.chat_prompt(golden.tokenizer, "Why?") == "Questions: Why? Answer:"
    templated = types.SimpleNamespace(
        chat_template="x", apply_chat_template=lambda turn, **kwargs: f"<user>{turn[0]['content']}<bot>"
    )
    assert serving.chat_prompt(templated, "Why?") == "<user>Why?<bot>Answer:"
    assert serving.chat_prompt(templated, "Why?", answer_prefix="") == "<user>Why?<bot>"


@pytest.mark.parametrize("with_memory", [True, False])
def test_answer_and_its_stream_match_greedy_decoding(golden, injected, with_memory):
    state = injected if with_memory else None
    raw, cut = reference_answer(golden, state, QUESTION, 16)
    expected = serving.finished_answer(raw, cut, 16)
    pieces = list(serving.answer_stream(golden, state, QUESTION, 16))
    assert serving.answer(golden, state, QUESTION, 16) == pieces[-1] == expected
    assert len(pieces) > 2 and all(raw.startswith(piece) for piece in pieces[: -1 if cut else None])


def test_memory_changes_the_answer(golden, injected):
    assert serving.answer(golden, injected, QUESTION, 16) != serving.answer(golden, None, QUESTION, 16)


def test_answer_stream_stops_generating_when_the_consumer_stops(golden, monkeypatch):
    lengths = []
    generate = golden.generate

    def recording_generate(*args, **kwargs):
        output = generate(*args, **kwargs)
        lengths.append(output.shape[1] - args[0].shape[1])
        return output

    monkeypatch.setattr(golden, "generate", recording_generate)
    list(serving.answer_stream(golden, None, QUESTION, 64))
    stream = serving.answer_stream(golden, None, QUESTION, 64)
    next(stream)
    stream.close()  # joins the generating thread
    assert lengths[0] == 64 and lengths[1] < 16, lengths


def test_answer_stream_reraises_errors_of_the_generating_thread(golden):
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(serving.answer_stream(golden, None, QUESTION, -1))


def test_token_chunks_split_at_the_inject_length(golden):
    ids = golden.tokenizer("z" * 1100, add_special_tokens=False)["input_ids"]
    chunks = serving.token_chunks(golden, "z" * 1100)
    assert [len(chunk) for chunk in chunks] == [512, 512, 76] and sum(chunks, []) == ids
    calls = []

    def encode(text, **options):
        calls.append(text)
        return golden.tokenizer(text, **options)

    assert serving.token_chunks(golden, "abc", encode=encode) == [[100, 101, 102]] and calls == ["abc"]
    with pytest.raises(ValueError, match="empty"):
        serving.token_chunks(golden, " \n")


def test_inject_steps_work_on_a_copy(golden):
    state = golden.new_memory_state()
    chunks = serving.token_chunks(golden, "z" * 600)
    steps = list(serving.inject_steps(golden, state, chunks, torch.Generator().manual_seed(3)))
    assert [done for done, _ in steps] == [1, 2, 2] and [s is None for _, s in steps] == [True, True, False]
    assert state.injections == 0 and not state.initialized  # the original never changes
    reference, generator = golden.new_memory_state(), torch.Generator().manual_seed(3)
    for ids in chunks:
        golden.inject(ids, memory=reference, generator=generator, show_progress=False)
    new = steps[-1][1]
    assert new.injections == 2 and torch.equal(new.memory, reference.memory)
    assert torch.equal(new.provenance, reference.provenance)


def test_memory_stats_of_a_known_state():
    assert serving.memory_stats(known_state()) == {
        "layers": 2,
        "rows": 4,
        "width": 8,
        "megabytes": 2 * 4 * 8 * 4 / 1e6,
        "dtype": "float32",
        "initialized": True,
        "injections": 2,
        "rows_written": 3,
        "initial_rows": 0,  # half a row per layer: layer 1 dropped it
        "rows_by_source": {-1: 1.0, 0: 0.5, 1: 1.5, 2: 1.0},
        "rows_by_injection": {1: 1.5, 2: 1.0},
        "archived_chunks": 0,
        "archived_rows": 0,
    }


def test_memory_stats_count_the_archive():
    from tests.test_variant_ranked import archived

    _, state = archived()
    stats = serving.memory_stats(state)
    assert stats["archived_chunks"] == 8 and stats["archived_rows"] == 24
    assert stats["megabytes"] == state.nbytes / 1e6 > state.memory.numel() * 4 / 1e6
    assert stats_line(state).endswith("; archive: 8 chunks, 24 rows")


def test_cli_stats_line_formats_memory_stats():
    assert stats_line(known_state()) == (
        "memory 2 layers x 4 rows x 8 (0.0 MB, float32); initialized=True; injections=2; "
        "rows written per layer: 3 of 4; rows per layer by injection: #1: 1.5, #2: 1"
    )
    empty = MemoryState(torch.zeros(1, 2, 3, dtype=torch.bfloat16))
    assert stats_line(empty).endswith("injections=0; rows written per layer: 0 of 2; rows per layer by injection: none")


def test_load_model_and_state(tmp_path, injected, golden):
    model = serving.load_model(GOLDEN_A / "checkpoint", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert serving.load_state(model, tmp_path / "missing.safetensors").injections == 0
    path = tmp_path / "memory.safetensors"
    injected.save(path, config=golden.config)
    loaded = serving.load_state(golden, path)
    assert loaded.injections == 1 and torch.equal(loaded.memory, injected.memory)
