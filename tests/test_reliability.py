"""
Reliability of `inject`, `injected`, `compute_delta` and `generate` under hostile inputs (property-based).

Every call either works, and then equals the unbatched, unpadded, unchunked computation, or raises one clear
`ValueError`; when it raises, every memory it was given is bit-for-bit unchanged (tensors, provenance, counters).
A crash in the middle of an injection (an exception on the second chunk, Ctrl-C) changes nothing either.
"""

import pytest


pytest.importorskip("hypothesis")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: one thread beats two contended ones

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from modeling_memoryllm import MemoryState, injection  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402


VOCAB, N, CHUNK = 97, 4, 12  # tiny model: vocab size, num_tokens, max_inject_length
LENGTHS = [1, N - 1, N, N + 1, CHUNK - 1, CHUNK, CHUNK + 1, 40]  # around N and the chunk length, and far beyond
PROPERTY = settings(
    derandomize=True,  # the same cases on every run (CI reproducible)
    database=None,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class CharTokenizer:
    """A minimal tokenizer: one id in [3, 96] per code point (control characters, CJK, emoji, combining marks)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        assert not add_special_tokens
        return {"input_ids": [3 + ord(char) % (VOCAB - 3) for char in text]}


def char_level_fast_tokenizer():
    """A real `PreTrainedTokenizerFast` built offline: printable ASCII by character, everything else `<unk>`=3."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({chr(code): 4 + i for i, code in enumerate(range(32, 122))})  # ids 4..93 < VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # (?m): dot matches \n
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def models():
    """The released write rule and the training-free one, both with a character tokenizer."""
    result = {"output": tiny_model(), "input": tiny_model(memory_write_rule="input")}
    for model in result.values():
        model.tokenizer = CharTokenizer()
    return result


@pytest.fixture(scope="module")
def model(models):
    return models["output"]


@pytest.fixture(scope="module")
def state_pool(model):
    """Three different initialised memories (never mutated by the tests that read them)."""
    pool = [model.memory_state.clone() for _ in range(3)]
    with torch.no_grad():
        model.inject(list(range(10, 30)), memory=pool[1], generator=torch.Generator().manual_seed(1))
        model.inject(list(range(50, 90)), memory=pool[2], generator=torch.Generator().manual_seed(2))
    return pool


# ------------------------------------------------------------------------------------------------------ helpers
def snapshot(state: MemoryState):
    return (
        state.memory.detach().clone(),
        state.provenance.clone(),
        state.initialized,
        state.injections,
        state.version,
        state.memory.data_ptr(),
    )


def assert_unchanged(state: MemoryState, before) -> None:
    """Bit-for-bit: the same bytes in the same storage, and the same provenance, flag and counters."""
    memory, provenance, initialized, injections, version, pointer = before
    assert state.memory.data_ptr() == pointer
    assert torch.equal(state.memory.detach().view(torch.uint8), memory.view(torch.uint8))
    assert torch.equal(state.provenance, provenance)
    assert (state.initialized, state.injections, state.version) == (initialized, injections, version)


def fresh_state(model, initialized: bool) -> MemoryState:
    return model.memory_state.clone() if initialized else model.new_memory_state()


def assert_same_state(actual: MemoryState, expected: MemoryState, tol: float = 0.0) -> None:
    if tol:
        torch.testing.assert_close(actual.memory, expected.memory, atol=tol, rtol=tol)
    else:
        assert torch.equal(actual.memory, expected.memory)
    assert torch.equal(actual.provenance, expected.provenance)
    assert (actual.initialized, actual.injections) == (expected.initialized, expected.injections)


@torch.no_grad()
def reference_inject(model, ids: list[int], state: MemoryState, generator: torch.Generator) -> MemoryState:
    """Chunk by chunk through the public pieces: `compute_delta` on each unpadded chunk, then the variant's update."""
    for start in range(0, len(ids), model.config.max_inject_length):
        chunk = torch.tensor([ids[start : start + model.config.max_inject_length]])
        delta = model.compute_delta(chunk, memory=state)[0]
        injections = state.injections + 1
        state.take(model.variant.update(state, delta, injections, generator))
    return state


def token_ids(length: int):
    return st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length)


def as_form(ids: list[int], form: str):
    """The same token ids in each accepted input form."""
    if form == "list":
        return list(ids)
    if form == "tuple":
        return tuple(ids)
    if form == "int64":
        return torch.tensor(ids)
    if form == "int32":
        return torch.tensor(ids, dtype=torch.int32)
    if form == "uint8":
        return torch.tensor(ids, dtype=torch.uint8)
    if form == "2d":
        return torch.tensor([ids])
    if form == "nested":
        return [list(ids)]
    raise AssertionError(form)


FORMS = ["list", "tuple", "int64", "int32", "uint8", "2d", "nested"]
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2028\u3000"
SPECIAL_TEXTS = [
    "\x00",
    "\x00\x00 nul bytes \x00",
    "\x1b[31mred\x1b[0m",
    "line\r\nbreak\rcarriage",
    "e\u0301\u0301\u0301 combining",
    "日本語のテキスト、とても長い文章です。" * 3,
    "👩\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 emoji",
    "\u200b",  # zero-width space: not whitespace for Python, so it is injected
    "\ufeffBOM",
    "a",
    "x" * (CHUNK + 1),
]
texts = st.one_of(
    st.text(max_size=45),
    st.sampled_from(SPECIAL_TEXTS),
    st.text(alphabet=WHITESPACE, max_size=6),  # empty or whitespace-only: refused
)


# --------------------------------------------------------------------------------------------- inject: properties
@pytest.mark.parametrize("length", LENGTHS)
@settings(PROPERTY, max_examples=4)
@given(
    rule=st.sampled_from(["output", "input"]),
    initialized=st.booleans(),
    data=st.data(),
    form=st.sampled_from(FORMS),
    seed=st.integers(0, 2**16),
)
def test_inject_equals_chunk_by_chunk_reference(models, length, rule, initialized, data, form, seed):
    model = models[rule]
    ids = data.draw(token_ids(length))
    event(f"{rule}, {'initialised' if initialized else 'empty'} memory, {form}")
    injected = model.inject(
        as_form(ids, form), memory=fresh_state(model, initialized), generator=torch.Generator().manual_seed(seed)
    )
    expected = reference_inject(model, ids, fresh_state(model, initialized), torch.Generator().manual_seed(seed))
    assert injected.injections == -(-len(ids) // CHUNK)  # one injection per chunk
    assert_same_state(injected, expected)
    assert torch.isfinite(injected.memory).all()


@PROPERTY
@given(text=texts, initialized=st.booleans(), seed=st.integers(0, 2**16))
def test_inject_text_equals_its_token_ids_or_refuses_blank_text(model, text, initialized, seed):
    state = fresh_state(model, initialized)
    event("blank: refused" if not text.strip() else "injected")
    if not text.strip():
        before = snapshot(state)
        with pytest.raises(ValueError, match="empty or whitespace-only"):
            model.inject(text, memory=state)
        assert_unchanged(state, before)
        return
    from_text = model.inject(text, memory=state, generator=torch.Generator().manual_seed(seed))
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    from_ids = model.inject(ids, memory=fresh_state(model, initialized), generator=torch.Generator().manual_seed(seed))
    assert_same_state(from_text, from_ids)


@pytest.fixture(scope="module")
def fast_tokenizer_model():
    model = tiny_model()
    model.tokenizer = char_level_fast_tokenizer()
    return model


@torch.no_grad()
@pytest.mark.parametrize("text", SPECIAL_TEXTS + ["plain ascii text that is long enough to need two chunks"])
def test_pretrained_fast_tokenizer_handles_unicode_and_control_characters(fast_tokenizer_model, text):
    model = fast_tokenizer_model
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids and all(0 <= i < VOCAB for i in ids)
    from_text = model.inject(text, memory=model.memory_state.clone(), generator=torch.Generator().manual_seed(0))
    expected = reference_inject(model, ids, model.memory_state.clone(), torch.Generator().manual_seed(0))
    assert_same_state(from_text, expected)


@PROPERTY
@given(
    rule=st.sampled_from(["output", "input"]),
    items=st.lists(
        st.tuples(st.sampled_from(LENGTHS), st.booleans(), st.booleans()),  # length, initialised, as text
        min_size=2,
        max_size=3,
    ),
    data=st.data(),
)
def test_batched_inject_equals_each_input_alone(models, rule, items, data):
    model = models[rule]
    inputs = []
    for length, _, as_text in items:
        if as_text:
            inputs.append(data.draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=length, max_size=length)))
            if not inputs[-1].strip():
                inputs[-1] = "x" + inputs[-1][1:]
        else:
            inputs.append(data.draw(token_ids(length)))
    seeds = data.draw(st.lists(st.integers(0, 2**16), min_size=len(items), max_size=len(items)))
    event(f"{len(items)} inputs, {len({i for _, i, _ in items})} kinds of memory")
    for length, _, as_text in items:
        event(f"length {length} ({'text' if as_text else 'ids'})")
    batched = [fresh_state(model, initialized) for _, initialized, _ in items]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    returned = model.inject(inputs, memory=batched, generator=generators)
    assert returned == batched  # the same objects, updated in place
    for (_, initialized, _), text, seed, state in zip(items, inputs, seeds, batched):
        alone = model.inject(
            text, memory=fresh_state(model, initialized), generator=torch.Generator().manual_seed(seed)
        )
        assert_same_state(state, alone, tol=1e-5)
    # `injected` is `inject` without the commit: the same numbers, new objects, inputs untouched
    sources = [fresh_state(model, initialized) for _, initialized, _ in items]
    befores = [snapshot(s) for s in sources]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    with torch.no_grad():
        new = model.injected(inputs, memory=sources, generator=generators)
    for source, before, state, result in zip(sources, befores, batched, new):
        assert result is not source
        assert_unchanged(source, before)
        assert_same_state(result, state)


# --------------------------------------------------------------------------------- compute_delta / generate: padding
def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    longest = max(len(r) for r in rows)
    pads = [longest - len(r) for r in rows]
    input_ids = torch.tensor([[pad_id] * p + r for p, r in zip(pads, rows)])
    mask = torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pads, rows)])
    return input_ids, mask, pads


MEMORY_MODES = ["shared-initialised", "shared-uninitialised", "per-row-initialised", "per-row-uninitialised"]


def memories_for(model, mode: str, rows: int, pool: list[MemoryState]):
    """`memory=` for a batch (one state or one per row), and the state that each row reads."""
    if mode == "shared-initialised":
        return pool[0], [pool[0]] * rows
    if mode == "shared-uninitialised":
        state = model.new_memory_state()
        return state, [state] * rows
    states = [pool[i % len(pool)] for i in range(rows)] if mode == "per-row-initialised" else None
    states = states or [model.new_memory_state() for _ in range(rows)]
    return states, states


@PROPERTY
@given(
    rows=st.lists(st.sampled_from([N, N + 1, CHUNK - 1, CHUNK, CHUNK + 1, 40]).flatmap(token_ids), max_size=2),
    first=st.sampled_from([N, 7]).flatmap(token_ids),
    pad_id=st.integers(0, VOCAB - 1),  # what the padding holds must not matter
    mode=st.sampled_from(MEMORY_MODES),
    rule=st.sampled_from(["output", "input"]),
)
@torch.no_grad()
def test_compute_delta_on_left_padded_batch_equals_each_row_alone(models, state_pool, rows, first, pad_id, mode, rule):
    model = models[rule]
    rows = [first, *rows]
    input_ids, mask, pads = left_padded(rows, pad_id)
    event(f"{len(rows)} rows, {'padded' if any(pads) else 'unpadded'}")
    memory, per_row = memories_for(model, mode, len(rows), state_pool)
    befores = [snapshot(s) for s in per_row]
    delta, logits = model.compute_delta(input_ids, memory=memory, attention_mask=mask, output_logits=True)
    assert delta.shape == (len(rows), model.config.num_hidden_layers, N, model.config.hidden_size)
    for row, (ids, pad, state) in enumerate(zip(rows, pads, per_row)):
        alone, alone_logits = model.compute_delta(torch.tensor([ids]), memory=state, output_logits=True)
        torch.testing.assert_close(delta[row], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[row, pad:], alone_logits[0], atol=1e-4, rtol=1e-4)
    for state, before in zip(per_row, befores):
        assert_unchanged(state, before)  # compute_delta never writes


@PROPERTY
@given(
    rows=st.lists(st.integers(1, 8).flatmap(lambda n: st.lists(st.integers(3, VOCAB - 1), min_size=n, max_size=n))),
    first=st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=8),
    mode=st.sampled_from(["own", *MEMORY_MODES]),
)
@torch.no_grad()
def test_generate_on_left_padded_batch_equals_each_row_alone(model, state_pool, rows, first, mode):
    rows = [first, *rows[:2]]
    input_ids, mask, pads = left_padded(rows, pad_id=0)
    event(f"{len(rows)} rows, {'padded' if any(pads) else 'unpadded'}")
    memory, per_row = (
        (None, [model.memory_state] * len(rows)) if mode == "own" else memories_for(model, mode, len(rows), state_pool)
    )
    befores = [snapshot(s) for s in per_row]
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    generated = model.generate(input_ids, attention_mask=mask, memory=memory, **options)
    for row, (ids, pad, state) in enumerate(zip(rows, pads, per_row)):
        alone = model.generate(torch.tensor([ids]), memory=None if mode == "own" else state, **options)[0]
        batched = generated[row, pad:]
        assert torch.equal(batched[: len(alone)], alone)
        if len(alone) < len(batched):
            event("a row stopped early at EOS")
        assert (batched[len(alone) :] == 0).all()  # a row that stopped at EOS is padded, not continued
    for state, before in zip(per_row, befores):
        assert_unchanged(state, before)  # reading never writes


# ----------------------------------------------------------------------------------- invalid inputs: ValueError
OUT_OF_VOCAB = st.one_of(st.integers(VOCAB, 2**70), st.integers(-(2**70), -1))
NOT_IDS = st.one_of(
    st.none(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.binary(max_size=4),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sets(st.integers(3, 9), max_size=2),
    st.just(np.array([3, 4, 5])),
    st.just([np.int64(3), np.int64(4)]),
    st.just(object()),
)


@st.composite
def invalid_inputs(draw):
    """Inputs that must be refused as a whole, including valid inputs mixed with one bad item."""
    kind = draw(st.sampled_from(["float", "bool", "complex", "rank", "oov-list", "oov-tensor", "not-ids", "mixed"]))
    length = draw(st.sampled_from(LENGTHS))
    if kind == "float":
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
        return (torch.arange(length) % (VOCAB - 3) + 3).to(dtype)
    if kind == "bool":
        return torch.ones(draw(st.sampled_from([(length,), (2, length)])), dtype=torch.bool)
    if kind == "complex":
        return torch.ones(length, dtype=torch.complex64)
    if kind == "rank":
        return torch.full(draw(st.sampled_from([(), (1, 1, length), (2, 1, 1, length)])), 5)
    if kind == "oov-list":
        ids = draw(token_ids(length))
        ids[draw(st.integers(0, length - 1))] = draw(OUT_OF_VOCAB)
        return ids
    if kind == "oov-tensor":
        ids = torch.tensor(draw(token_ids(length)))
        ids[draw(st.integers(0, length - 1))] = draw(st.one_of(st.integers(VOCAB, 2**62), st.integers(-(2**62), -1)))
        return ids if draw(st.booleans()) else ids.unsqueeze(0)
    if kind == "not-ids":
        return draw(
            st.one_of(NOT_IDS, st.just([]), st.just(()), st.just([[]]), st.just(torch.zeros(2, 0, dtype=torch.long)))
        )
    bad = draw(
        st.one_of(
            NOT_IDS,
            st.text(alphabet=WHITESPACE, max_size=4),
            st.just([]),
            OUT_OF_VOCAB.map(lambda i: [5, i]),
            st.just([3, 4.0]),
            st.just([3, None]),
        )
    )
    good = draw(st.one_of(token_ids(length), st.just("valid text")))
    items = [good, bad] if draw(st.booleans()) else [bad, good]
    return items


@settings(PROPERTY, max_examples=40)
@given(bad=invalid_inputs(), target=st.sampled_from(["own", "clone", "uninitialised", "batched"]), api=st.booleans())
def test_invalid_inputs_raise_value_error_and_change_nothing(model, bad, target, api):
    if target == "own":
        memory, states = None, [model.memory_state]
    elif target == "batched":
        states = [model.memory_state.clone(), model.new_memory_state()]
        memory = states
        bad = bad if isinstance(bad, list) and len(bad) == 2 else [list(range(10, 20)), bad]
    else:
        memory = fresh_state(model, target == "clone")
        states = [memory]
    befores = [snapshot(s) for s in states]
    parameter = model.memory.detach().clone()
    call = model.inject if api else model.injected
    with pytest.raises(ValueError) as error:
        call(bad, memory=memory, generator=torch.Generator().manual_seed(0))
    assert len(str(error.value)) > 10
    for state, before in zip(states, befores):
        assert_unchanged(state, before)
    assert torch.equal(model.memory, parameter)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([[3.0, 4.0, 5.0, 6.0]]),
        torch.tensor([[True, False, True, True]]),
        torch.tensor([3, 4, 5, 6]),  # 1-D
        torch.tensor([[[3, 4, 5, 6]]]),  # 3-D
        torch.tensor([[3, 4, 5, VOCAB]]),
        torch.tensor([[3, 4, -1, 6]]),
        torch.zeros(1, 0, dtype=torch.long),
        [[3, 4, 5, 6]],  # not a tensor
    ],
)
def test_compute_delta_refuses_bad_ids(model, bad):
    state = model.memory_state.clone()
    before = snapshot(state)
    with pytest.raises(ValueError):
        model.compute_delta(bad, memory=state)
    assert_unchanged(state, before)


def test_compute_delta_refuses_padded_rows_shorter_than_n_tokens(model):
    input_ids, mask, _ = left_padded([[5, 6, 7], [5, 6, 7, 8, 9]], pad_id=0)
    state = model.memory_state.clone()
    before = snapshot(state)
    with pytest.raises(ValueError, match="at least num_tokens=4"):
        model.compute_delta(input_ids, memory=state, attention_mask=mask)
    assert_unchanged(state, before)


@pytest.mark.parametrize("api", ["inject", "compute_delta"])
def test_meta_device_ids_raise_and_change_nothing(model, api):
    """Ids on a device without data (`meta`; the only wrong device on a CPU-only machine) are refused."""
    state = model.memory_state.clone()
    before = snapshot(state)
    ids = torch.tensor([[5, 6, 7, 8, 9]], device="meta")
    with pytest.raises(ValueError):
        getattr(model, api)(ids, memory=state)
    assert_unchanged(state, before)


@pytest.mark.parametrize("api", ["inject", "compute_delta"])
def test_meta_device_ids_give_a_clear_value_error(model, api):
    with pytest.raises(ValueError, match="meta"):
        getattr(model, api)(torch.tensor([[5, 6, 7, 8, 9]], device="meta"), memory=model.memory_state.clone())


GENERATE_BAD_IDS = {
    "out-of-vocab": torch.tensor([[3, 4, VOCAB]]),
    "negative": torch.tensor([[3, -1, 4]]),
    "float": torch.tensor([[3.0, 4.0]]),
    "meta": torch.tensor([[3, 4]], device="meta"),
}


@pytest.mark.parametrize("case", list(GENERATE_BAD_IDS))
def test_generate_with_bad_ids_raises_and_changes_nothing(model, case):
    state = model.memory_state.clone()
    before = snapshot(state)
    with pytest.raises(ValueError):
        model.generate(GENERATE_BAD_IDS[case], memory=state, max_new_tokens=2, do_sample=False)
    assert_unchanged(state, before)


@pytest.mark.parametrize("case", list(GENERATE_BAD_IDS))
def test_generate_with_bad_ids_gives_a_clear_value_error(model, case):
    with pytest.raises(ValueError, match="Token ids|input_ids|meta"):
        model.generate(GENERATE_BAD_IDS[case], memory=model.memory_state.clone(), max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize(
    "generator",
    [[torch.Generator()], [torch.Generator(), 3], 5, "seed"],
    ids=["too-few", "not-a-generator-in-list", "int", "str"],
)
def test_bad_generators_raise_and_change_nothing(model, generator):
    """Bad `generator=` arguments fail inside the drop (IndexError/TypeError today), after all deltas were
    computed but before anything is committed: no state changes."""
    states = [model.memory_state.clone(), model.memory_state.clone()]
    befores = [snapshot(s) for s in states]
    with pytest.raises((ValueError, TypeError, IndexError)):
        model.inject([list(range(10, 30)), list(range(40, 60))], memory=states, generator=generator)
    for state, before in zip(states, befores):
        assert_unchanged(state, before)


WRONG_MEMORY_TYPES = {"str": "not a state", "list-of-object": [object()], "tensor": torch.zeros(2, 12, 32)}


@pytest.mark.parametrize(
    "memory",
    [MemoryState(torch.zeros(2, 12, 16)), MemoryState(torch.zeros(3, 12, 32)), [MemoryState(torch.zeros(2, 6, 32))]],
    ids=["hidden-size", "layers", "rows-in-list"],
)
@pytest.mark.parametrize("api", ["inject", "injected", "compute_delta", "generate"])
def test_a_memory_of_another_shape_is_refused(model, memory, api):
    own = snapshot(model.memory_state)
    with pytest.raises(ValueError, match="does not fit this model"):
        if api in ("compute_delta", "generate"):
            ids = torch.tensor([list(range(10, 30))])
            getattr(model, api)(ids, memory=memory, **({"max_new_tokens": 2} if api == "generate" else {}))
        else:
            getattr(model, api)([list(range(10, 30))], memory=memory)
    assert_unchanged(model.memory_state, own)


@pytest.mark.parametrize("memory", list(WRONG_MEMORY_TYPES.values()), ids=list(WRONG_MEMORY_TYPES))
@pytest.mark.parametrize("api", ["inject", "injected"])
def test_a_memory_of_the_wrong_type_raises_and_changes_nothing(model, memory, api):
    own = snapshot(model.memory_state)
    with pytest.raises(ValueError):
        getattr(model, api)(list(range(10, 30)), memory=memory)
    assert_unchanged(model.memory_state, own)


@pytest.mark.parametrize("memory", list(WRONG_MEMORY_TYPES.values()), ids=list(WRONG_MEMORY_TYPES))
def test_a_memory_of_the_wrong_type_gives_a_clear_value_error(model, memory):
    with pytest.raises(ValueError, match="MemoryState"):
        model.inject(list(range(10, 30)), memory=memory)


def test_an_empty_batch_changes_nothing(model):
    """A tensor of 0 rows: a silent no-op today (while `[]` is refused); either is acceptable, a change is not."""
    state = model.memory_state.clone()
    before = snapshot(state)
    try:
        model.inject(torch.zeros(0, 5, dtype=torch.long), memory=state)
    except ValueError:
        pass
    assert_unchanged(state, before)
    with pytest.raises(ValueError):
        model.inject(torch.zeros(0, 5, dtype=torch.long), memory=[])


def test_the_same_state_twice_in_a_batch_keeps_both_inputs_or_is_refused(model):
    first, second = list(range(10, 22)), list(range(40, 52))
    state = model.memory_state.clone()
    before = snapshot(state)
    try:
        model.inject([first, second], memory=[state, state], generator=torch.Generator().manual_seed(0))
    except ValueError:
        assert_unchanged(state, before)
        return
    sequential = model.inject([first, second], memory=model.memory_state.clone())
    assert state.injections == sequential.injections == 2


@torch.no_grad()
def test_compute_delta_refuses_short_padded_rows_on_an_uninitialised_memory_too(model):
    input_ids, mask, _ = left_padded([[5, 6, 7], [5, 6, 7, 8, 9]], pad_id=0)
    alone = model.compute_delta(torch.tensor([[5, 6, 7]]), memory=model.new_memory_state())
    try:
        delta = model.compute_delta(input_ids, memory=model.new_memory_state(), attention_mask=mask)
    except ValueError:
        return
    assert delta[0].shape == alone[0].shape  # fails: [L, 4, d] with a padding row vs [L, 3, d] alone


# ---------------------------------------------------------------------------------------- crashes mid-injection
class Crash(Exception):
    pass


def crash_on_call(real, crash_at: int, error: BaseException):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise error
        return real(*args, **kwargs)

    return wrapper, calls


@pytest.mark.parametrize("error", [Crash("boom"), KeyboardInterrupt(), MemoryError()], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("where", ["planned_update", "inject_group", "injection_pass"])
@pytest.mark.parametrize("target", ["own", "clone", "batched"])
def test_crash_in_the_middle_of_inject_changes_nothing(model, monkeypatch, error, where, target):
    """40 tokens: 4 chunks, so the crash (2nd call) comes after a chunk was already computed."""
    owner = type(model.variant) if where == "planned_update" else injection  # the variant's rule, or the injection pass
    wrapper, calls = crash_on_call(getattr(owner, where), 2, error)
    monkeypatch.setattr(owner, where, wrapper)
    text = list(range(10, 50))
    if target == "batched":
        states = [model.memory_state.clone(), model.new_memory_state()]
        inputs, memory = [text, text[:20]], states
    else:
        states = [model.memory_state if target == "own" else model.memory_state.clone()]
        inputs, memory = text, None if target == "own" else states[0]
    befores = [snapshot(s) for s in states]
    parameter, flag = model.memory.detach().clone(), model.initialized.clone()
    prefix = model.memory_state.prefix
    with pytest.raises(type(error)):
        model.inject(inputs, memory=memory, generator=torch.Generator().manual_seed(0))
    assert calls["n"] == 2
    for state, before in zip(states, befores):
        assert_unchanged(state, before)
    assert torch.equal(model.memory, parameter) and torch.equal(model.initialized, flag)
    assert model.memory_state.prefix is prefix  # no cached reading prefix was dropped either
    monkeypatch.undo()
    retry = states[0].clone()  # and the memory still works: the same injection now succeeds
    model.inject(text, memory=retry, generator=torch.Generator().manual_seed(0))
    assert retry.injections == states[0].injections + 4
