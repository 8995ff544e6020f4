"""Retention's unrelated contexts computed once (`eval/runners/shared.py`) equal injecting them into every memory."""

import pytest
import torch

from eval.runners.shared import SharedTexts
from modeling_memoryllm.cache_memoryllm import reading_prefix, reading_prefix_key
from tests.tiny import tiny_model


def ranked_model(**options):
    torch.manual_seed(0)
    options = dict(memory_variant="training-free-ranked", num_tokens=4, num_blocks=5, max_inject_length=4) | options
    options.setdefault("text_context", "own")
    model = tiny_model(0, **options)
    model.memory_state.reset()
    return model


# Chunks of 4: text 1 takes two, text 2 fills one whole (so text 3 continues it), text 4 takes two. Texts 0, 2, 4
# and the contexts open with the same two tokens (as framed texts do): the memory reads that opening once.
TEXTS = [[60, 61, 7], [8, 9, 10, 11, 12, 13], [60, 61, 16, 17], [18, 19], [60, 61, 22, 23, 24], [25, 26, 27]]


def direct(model, context: list[int], seed: int) -> list:
    """The reference: a fresh memory, the context, then every text injected as usual; the state after each."""
    state, generator = model.new_memory_state(), torch.Generator().manual_seed(seed)
    model.inject(context, memory=state, generator=generator, show_progress=False)
    states = []
    for text in TEXTS:
        model.inject(text, memory=state, generator=generator, show_progress=False)
        states.append(state.clone())
    return states


def assert_same_state(fast, reference) -> None:
    torch.testing.assert_close(fast.memory, reference.memory, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.provenance, reference.provenance) and fast.injections == reference.injections
    torch.testing.assert_close(fast.scores, reference.scores)
    assert [number for number, _ in fast.archive] == [number for number, _ in reference.archive]
    for (_, got), (_, want) in zip(fast.archive, reference.archive):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


ARCHIVE = {"memory_read": "relevant", "read_chunks": 1, "drop_memory_per_layer": False, "archive_rows": 12}


@torch.no_grad()
@pytest.mark.parametrize("drop", ["attention", "random"])
@pytest.mark.parametrize("context", [[60, 61, 32], [60, 61, 32, 33]])  # the second ends on a whole chunk
@pytest.mark.parametrize("archive", [{}, ARCHIVE])
def test_shared_texts_equal_injecting_each_text(drop, context, archive):
    model = ranked_model(memory_drop=drop, **archive)
    shared = SharedTexts(model, TEXTS)
    state, generator = model.new_memory_state(), torch.Generator().manual_seed(3)
    model.inject(context, memory=state, generator=generator, show_progress=False)
    tracks, states, repeated = [shared.track(state)], [state], False
    for index, reference in enumerate(direct(model, context, 3)):
        tracks, states = shared.inject(index, tracks, states, [generator])
        fast = shared.states(tracks, states)[0]
        assert_same_state(fast, reference)
        repeated = repeated or bool((fast.scores < 0).any())
        expected = reading_prefix(model, reference.clone())
        cached = fast.cached_prefix(reading_prefix_key(model))  # put together from shared rows, under reading's key
        prefix = reading_prefix(model, fast)
        assert (cached is not None and prefix is cached) if states[0] is None else cached is None
        assert prefix.length == expected.length
        assert torch.equal(prefix.written, expected.written) if expected.written is not None else prefix.written is None
        for layer in range(model.config.num_hidden_layers):
            for got, want in zip(prefix.layer(layer), expected.layer(layer)):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert shared.counts["shared"] > 0 and repeated  # repeated openings were found (and read once)
    assert bool(fast.archive) == bool(archive) and sum(rows.shape[1] for _, rows in fast.archive) <= 12
    # Texts 0 (after a 4-token context) and 3 (after text 2, a whole chunk) read the text before them: injected.
    assert shared.counts["direct"] == (2 if len(context) == 4 else 1)


def test_variants_whose_injections_read_older_texts_inject_every_text():
    model = tiny_model(0, memory_variant="training-free", num_tokens=4, num_blocks=3, max_inject_length=4)
    model.memory_state.reset()
    shared = SharedTexts(model, TEXTS[:2])
    assert not shared.enabled and shared.track(model.new_memory_state()) is None
    states = [model.new_memory_state(), model.new_memory_state()]
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    tracks, states = shared.inject(0, [None, None], states, generators)
    reference = model.new_memory_state()
    model.inject(TEXTS[0], memory=reference, generator=torch.Generator().manual_seed(2), show_progress=False)
    torch.testing.assert_close(states[1].memory, reference.memory)  # one batched call for both memories
    assert torch.equal(states[1].provenance, reference.provenance) and shared.counts == {"shared": 0, "direct": 2}


def test_a_variant_reading_the_last_rows_shares_nothing():
    model = ranked_model(text_context="window")
    shared = SharedTexts(model, TEXTS[:3])
    assert shared.enabled and all(not shareable for shareable, _ in shared.writes[1:])
    state = model.new_memory_state()
    model.inject([60, 61, 32], memory=state)
    tracks, states = shared.inject(0, [shared.track(state)], [state], [torch.Generator().manual_seed(0)])
    assert shared.counts == {"shared": 0, "direct": 1} and states[0] is state


def test_no_texts_to_share_leaves_every_memory_as_it_is():
    """`--ks 0` alone: no unrelated contexts, so nothing is computed and a memory is read as injected."""
    model = ranked_model()
    shared = SharedTexts(model, [])
    state = model.new_memory_state()
    model.inject([60, 61, 32], memory=state)
    assert not shared.enabled and shared.track(state) is None
    assert shared.states([shared.track(state)], [state])[0] is state
