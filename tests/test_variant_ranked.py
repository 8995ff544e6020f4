"""The `training-free-ranked` variant: each text written on its own, a full memory drops its least-attended rows."""

import pytest
import torch

from modeling_memoryllm import MemoryLLMConfig, MemoryState
from modeling_memoryllm.lora import active_adapter
from modeling_memoryllm.memory_state_ranked import RankedMemoryState
from modeling_memoryllm.variant_ranked import TrainingFreeRanked, row_scores
from tests.tiny import tiny_config, tiny_model


pytestmark = pytest.mark.filterwarnings("ignore:Injecting fewer than")


def ranked(**options):
    options = dict(memory_variant="training-free-ranked", num_tokens=4, num_blocks=3, max_inject_length=4) | options
    options.setdefault("text_context", "own")
    model = tiny_model(0, **options)
    model.memory_state.reset()
    return model


def test_options_defaults_and_checks():
    config = tiny_config(memory_variant="training-free-ranked", max_inject_length=12)
    assert config.memory_drop == "attention" and config.attention_score == "mean" and config.attention_pool == 1
    assert config.text_context == "own"
    assert config.max_inject_length == config.num_tokens  # a chunk is stored whole
    assert isinstance(MemoryLLMConfig(**config.to_dict()).variant, TrainingFreeRanked)  # survives a save
    for bad in ({"memory_drop": "lru"}, {"attention_score": "max"}, {"attention_pool": 2}, {"text_context": "all"}):
        with pytest.raises(ValueError):
            tiny_config(memory_variant="training-free-ranked", **bad)
    assert not hasattr(tiny_config(memory_variant="training-free"), "memory_drop")  # the released rules: untouched


@torch.no_grad()
def test_each_text_is_written_on_its_own_and_chunks_of_a_text_read_each_other():
    model = ranked()
    alone = model.new_memory_state()
    model.inject([40, 41, 42], memory=alone)
    after = model.new_memory_state()
    model.inject([[5, 6, 7], [40, 41, 42]], memory=after)
    torch.testing.assert_close(after.memory[:, -3:], alone.memory[:, -3:], rtol=0, atol=1e-6)
    long = [50, 51, 52, 53, 54, 55]  # two chunks: the second reads the first
    first_alone, both = model.new_memory_state(), model.new_memory_state()
    model.inject(long, memory=both)
    model.inject(long[4:], memory=first_alone)
    assert not torch.allclose(both.memory[:, -2:], first_alone.memory[:, -2:])
    after_other = model.new_memory_state()
    model.inject([[5, 6, 7], long], memory=after_other)
    torch.testing.assert_close(after_other.memory[:, -6:], both.memory[:, -6:], rtol=0, atol=1e-6)


@torch.no_grad()
def test_an_opening_that_texts_share_is_read_once():
    model = ranked(num_blocks=4)
    state = model.new_memory_state()
    model.inject([[60, 61, 7], [60, 61, 9], [8, 60, 61]], memory=state)  # the last one has the tokens, not the opening
    scores, visible = state.scores[:, -9:], model.variant.prefix_written(state)[1:]
    assert scores[:, 3:5].eq(-1).all() and scores[:, :3].ge(0).all() and scores[:, 5:].ge(0).all()
    assert visible[-9:].tolist() == [True, True, True, False, False, True, True, True, True]
    # Reading it equals reading the same rows with the repeated ones never written (masked).
    plain = MemoryState(state.memory.clone(), True, state.provenance.clone(), state.injections)
    plain.provenance[:, -6:-4] = -1
    reference = tiny_model(0, memory_variant="training-free", num_tokens=4, num_blocks=4, max_inject_length=4)
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(model(ids, memory=state).logits, reference(ids, memory=plain).logits)


def test_a_full_memory_drops_the_lowest_scores_per_layer_older_first_among_equals():
    model = ranked()
    layers, rows = model.config.num_hidden_layers, model.config.memory_rows
    state = RankedMemoryState(
        torch.arange(rows, dtype=torch.float32).expand(layers, rows)[..., None].clone(),
        True,
        torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]] * layers),
        3,
        torch.tensor([[0.0, 0.4, 0.9, 0.1, 0.5, 0.1, 1.0, 0.7, 0.3, 0.8, 0.2, 0.6], [0.5] * 12]),
    )
    delta = torch.full((layers, 3, 1), -1.0)
    new = model.variant.updated(state, delta, torch.tensor([[0.5, 1.0, 0.0]] * layers), 4)
    # Layer 0 drops its three lowest (0.0, then the older 0.1, then the newer 0.1); layer 1 ties everywhere: the
    # three oldest go. Kept rows stay in order, the new ones follow.
    assert new.memory[0, :, 0].tolist() == [1, 2, 4, 6, 7, 8, 9, 10, 11, -1, -1, -1]
    assert new.memory[1, :, 0].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11, -1, -1, -1]
    assert new.provenance[0].tolist() == [1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    assert new.scores[0].tolist() == pytest.approx([0.4, 0.9, 0.5, 1.0, 0.7, 0.3, 0.8, 0.2, 0.6, 0.5, 1.0, 0.0])
    shared = ranked(drop_memory_per_layer=False).variant.updated(state, delta, torch.zeros(layers, 3), 4)
    assert torch.equal(shared.memory[0], shared.memory[1])  # one drop for every layer, by the summed scores


@torch.no_grad()
def test_random_drop_option_draws_as_the_training_free_rule():
    fills = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15], [16, 17, 18, 19], [20, 21]]
    provenances = []
    for variant in ("training-free", "training-free-ranked"):
        model = tiny_model(
            0, memory_variant=variant, num_tokens=4, num_blocks=3, max_inject_length=4, memory_drop="random"
        )
        state = model.new_memory_state()
        model.inject(fills, memory=state, generator=torch.Generator().manual_seed(5))
        provenances.append(state.provenance)
    assert torch.equal(*provenances)


@torch.no_grad()
def test_row_scores_rank_the_attention_the_rows_receive():
    model = ranked(attn_implementation="eager")
    delta = torch.randn(
        model.config.num_hidden_layers, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    scores = row_scores(model, delta)
    for idx, layer in enumerate(model.model.layers):  # reference: the layer's own eager attention weights
        rows = torch.cat([model.bos_embedding[idx], delta[idx]])[None]
        hidden = layer.input_layernorm(rows)
        positions = torch.arange(rows.shape[1])[None]
        causal = torch.full((6, 6), float("-inf")).triu(1)[None, None]
        with active_adapter(model.config.injection_adapter):  # the rows were written with the injection adapter
            _, weights = layer.self_attn(hidden, model.model.rotary_emb(hidden, positions), attention_mask=causal)
        probs = weights[0].sum(0)  # [queries, keys]
        relative = probs * torch.arange(1, 7)[:, None]
        received = relative.sum(0) / torch.arange(6, 0, -1)
        expected = received[1:].argsort().argsort().float() / 4
        assert torch.equal(scores[idx], expected), idx


def test_files_keep_the_scores_and_plain_files_load(tmp_path):
    model = ranked()
    state = model.new_memory_state()
    model.inject([[5, 6, 7, 8], [9, 10, 11]], memory=state)
    path = tmp_path / "ranked.safetensors"
    state.save(path, config=model.config)
    loaded = model.load_memory_state(path)
    assert isinstance(loaded, RankedMemoryState) and torch.equal(loaded.scores, state.scores)
    assert torch.equal(loaded.memory, state.memory) and loaded.injections == 2
    plain = MemoryState(state.memory.clone(), True, state.provenance.clone(), 2)
    plain.save(tmp_path / "plain.safetensors", config=model.config)
    from_plain = model.load_memory_state(tmp_path / "plain.safetensors")
    assert (
        from_plain.scores[state.provenance >= 0].eq(0.5).all() and from_plain.scores[state.provenance < 0].eq(0).all()
    )
    with pytest.raises(ValueError, match="'training-free-ranked' variant; load it with `model.load_memory_state"):
        MemoryState.load(path)  # the plain class, not the variant's
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 1
    (tmp_path / "damaged.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="checksum"):
        model.load_memory_state(tmp_path / "damaged.safetensors")


@torch.no_grad()
def test_reading_a_ranked_memory_is_the_training_free_reading():
    model = ranked()
    state = model.new_memory_state()
    model.inject([[5, 6, 7, 8], [9, 10, 11]], memory=state)
    reference = tiny_model(0, memory_variant="training-free", num_tokens=4, num_blocks=3, max_inject_length=4)
    plain = MemoryState(state.memory.clone(), True, state.provenance.clone(), state.injections)
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(model(ids, memory=state).logits, reference(ids, memory=plain).logits)
    copy = state.clone()
    assert isinstance(copy, RankedMemoryState) and torch.equal(copy.scores, state.scores)
    copy.reset()
    assert copy.scores.eq(0).all() and not copy.initialized


@torch.no_grad()
def test_window_context_reads_the_last_rows_as_the_training_free_rule():
    model = ranked(text_context="window")
    reference = tiny_model(0, memory_variant="training-free", num_tokens=4, num_blocks=3, max_inject_length=4)
    states = [model.new_memory_state(), reference.new_memory_state()]
    model.inject([5, 6, 7], memory=states[0])
    reference.inject([5, 6, 7], memory=states[1])
    window = slice(8, 12)
    assert model.variant.continues_text(states[0]) and not model.variant.writes_texts_apart
    assert torch.equal(
        model.variant.prefix_written(states[0], window), reference.variant.prefix_written(states[1], window)
    )
    alone = model.new_memory_state()
    model.inject([40, 41, 42], memory=alone)
    model.inject([40, 41, 42], memory=states[0])  # reads the text before it: other rows than alone
    assert not torch.allclose(states[0].memory[:, -3:], alone.memory[:, -3:])


@torch.no_grad()
def test_injection_writes_rows_and_scores_in_place_as_the_update_computes_them(monkeypatch):
    model = ranked()
    state = model.new_memory_state()
    for start in range(10, 40, 4):  # seven texts: the memory of 12 rows is full after three
        model.inject(list(range(start, start + 3)), memory=state)
    storage, before = state.memory.data_ptr(), state.clone()
    ids = [70, 71, 72]
    delta = model.compute_delta(torch.tensor([ids]), before)[0]
    expected = model.variant.update(before, delta, before.injections + 1, model=model)  # the functional update

    def copied(self, other):
        raise AssertionError("a new state was copied in: not one pass in place")

    monkeypatch.setattr(RankedMemoryState, "take", copied)
    model.inject(ids, memory=state)
    assert state.memory.data_ptr() == storage  # written in place, no replacement state
    assert isinstance(state, RankedMemoryState) and torch.equal(state.provenance, expected.provenance)
    torch.testing.assert_close(state.memory, expected.memory)
    torch.testing.assert_close(state.scores, expected.scores)
    assert not torch.equal(state.scores, before.scores)


# ------------------------------------------------------------------------------------- memory_read="relevant"
def relevant(**options):
    options = dict(num_blocks=4, memory_read="relevant", read_chunks=1, drop_memory_per_layer=False) | options
    return ranked(**options)


def only_chunks(state, chunks: list[int]) -> MemoryState:
    """`state` as a plain memory whose rows of other chunks were never written (the training-free rule masks them)."""
    provenance = state.provenance.clone()
    provenance[~torch.isin(provenance, torch.tensor(chunks))] = -1
    return MemoryState(state.memory.clone(), True, provenance, state.injections)


def test_read_options_defaults_and_checks():
    config = tiny_config(memory_variant="training-free-ranked")
    assert config.memory_read == "all" and config.read_chunks == 2
    with pytest.raises(ValueError, match="drop_memory_per_layer"):
        tiny_config(memory_variant="training-free-ranked", memory_read="relevant")  # per-layer drops by default
    for bad in ({"memory_read": "some"}, {"read_chunks": 0}):
        with pytest.raises(ValueError):
            tiny_config(memory_variant="training-free-ranked", drop_memory_per_layer=False, **bad)


def read_by_hand(model, state, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """The logits of transformers' own Llama forward over the prefix keys/values of `state`, with only bos and the
    rows of `chunks` visible, and the text's positions following the last of those rows."""
    from transformers import DynamicCache, LlamaForCausalLM

    from modeling_memoryllm.cache_memoryllm import reading_prefix
    from modeling_memoryllm.modeling_memoryllm import CACHE_KWARG

    prefix = reading_prefix(model, state)
    cache = DynamicCache()
    for idx in range(model.config.num_hidden_layers):
        keys, values = prefix.layer(idx)
        cache.update(keys.clone(), values.clone(), idx)
    read = torch.cat([torch.ones(1, dtype=torch.bool), torch.isin(state.provenance[0], torch.tensor(chunks))])
    last = int(read.nonzero().max()) + 1
    mask = torch.cat([read.long(), torch.ones(ids.shape[1], dtype=torch.long)])[None]
    positions = torch.arange(last, last + ids.shape[1])[None]
    with active_adapter(model.config.generation_adapter):
        out = LlamaForCausalLM.forward(model, ids, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: cache})
    return out.logits


@torch.no_grad()
def test_a_query_reads_only_the_chunks_that_share_its_tokens():
    model = relevant()
    state = model.new_memory_state()
    model.inject([[10, 11, 12], [20, 21, 22], [30, 31, 32]], memory=state)
    ids = torch.tensor([[5, 21, 6], [31, 7, 32]])  # row 0 asks about the second text, row 1 about the third
    logits = model(ids, memory=state).logits
    torch.testing.assert_close(logits[:1], read_by_hand(model, state, ids[:1], [2]))
    torch.testing.assert_close(logits[1:], read_by_hand(model, state, ids[1:], [3]))
    reference = tiny_model(0, memory_variant="training-free", num_tokens=4, num_blocks=4, max_inject_length=4)
    last = reference(ids[1:], memory=only_chunks(state, [3])).logits  # the last chunk: no rows to close up
    torch.testing.assert_close(logits[1:], last)
    everything = reference(ids, memory=MemoryState(state.memory, True, state.provenance, state.injections)).logits
    assert not torch.allclose(logits, everything, atol=1e-3)  # it does read less than the whole memory
    assert not torch.allclose(logits[:1], reference(ids[:1], memory=only_chunks(state, [2])).logits, atol=1e-3)
    # The choice is the prompt's: generated tokens read what it chose, at positions that go on from the prompt's.
    generated = model.generate(ids[:1], memory=state, max_new_tokens=4, do_sample=False)
    for step in range(4):
        expected = read_by_hand(model, state, generated[:, : 3 + step], [2])[0, -1].argmax()
        assert int(generated[0, 3 + step]) == int(expected)


@torch.no_grad()
def test_the_default_cache_holds_only_the_rows_read_and_pads_a_batch_to_the_longest():
    model = relevant()
    state = model.new_memory_state()
    model.inject([[10, 11, 12], [20, 21, 22], [30, 31, 32]], memory=state)
    ids = torch.tensor([[5, 21, 6], [0, 5, 6]])  # row 0 reads the second text; row 1 (left-padded) matches nothing
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    out = model(ids, attention_mask=mask, memory=state, use_cache=True)
    torch.testing.assert_close(out.logits[:1], read_by_hand(model, state, ids[:1], [2]))
    torch.testing.assert_close(out.logits[1:, 1:], relevant(memory_read="all")(ids[1:, 1:], memory=state).logits)
    cache = out.past_key_values
    assert cache.prefix_length == 1 + 9 < model.config.prefix_length  # the longest row: bos and every written row
    assert cache.prefix_written[0].sum() == 1 + 3 and cache.prefix_written[1].all()
    alone = model(ids[:1], memory=state, use_cache=True).past_key_values
    assert alone.prefix_length == 1 + 3 and alone.layers[0].keys.shape[2] == 4 + 3  # bos, the chunk, the text
    steps = model.generate(ids, attention_mask=mask, memory=state, max_new_tokens=3, do_sample=False)
    assert torch.equal(steps[:1], model.generate(ids[:1], memory=state, max_new_tokens=3, do_sample=False))


@torch.no_grad()
def test_a_query_that_shares_no_token_reads_the_whole_memory():
    model = relevant(read_chunks=2)
    state = model.new_memory_state()
    model.inject([[10, 11, 12], [20, 21, 22], [30, 31, 32]], memory=state)
    ids = torch.tensor([[5, 6, 7]])
    expected = relevant(memory_read="all")(ids, memory=state).logits
    torch.testing.assert_close(model(ids, memory=state).logits, expected)
    two = model(torch.tensor([[11, 31, 5]]), memory=state).logits  # two chunks match: both are read
    reference = tiny_model(0, memory_variant="training-free", num_tokens=4, num_blocks=4, max_inject_length=4)
    torch.testing.assert_close(two, reference(torch.tensor([[11, 31, 5]]), memory=only_chunks(state, [1, 3])).logits)


def test_chunk_relevance_sums_the_idf_of_the_shared_tokens():
    from modeling_memoryllm.variant_ranked import chunk_relevance

    rows = torch.eye(6)  # token t is row t
    chunks = torch.tensor([1, 1, 2, 2, 3, -1])  # chunk 1: tokens 0, 1; chunk 2: 2, 3; chunk 3: 4; row 5 never written
    query = torch.eye(6)[[0, 0, 2, 4, 5]]  # token 0 twice, and token 5 (in no written row)
    relevance = chunk_relevance(rows, chunks, torch.tensor([1, 2, 3]), query)
    idf = torch.log1p(torch.tensor((3 - 1 + 0.5) / (1 + 0.5)))  # each shared token is in one chunk of three
    torch.testing.assert_close(relevance, torch.stack([idf, idf, idf]))
    common = torch.tensor([1, 2, 3, 3, 3, -1])  # token 0 in chunk 1, 1 in 2, 2-4 in chunk 3
    relevance = chunk_relevance(rows, common, torch.tensor([1, 2, 3]), torch.eye(6)[[0, 2, 3]])
    torch.testing.assert_close(relevance, torch.stack([idf, torch.tensor(0.0), 2 * idf]))


# ------------------------------------------------------------------------------------------ read_match="folded"
def word_tokenizer():
    """A real `PreTrainedTokenizerFast` over 64 words `w{i}` (ids 0, 1: `<s>`, `</s>`), with "Paris" (21),
    "paris" (40), " PARIS" (41), a replacement character (42) and a lone space (43)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(2, 64)} | {"<s>": 0, "</s>": 1}
    special = {21: "Paris", 40: "paris", 41: " PARIS", 42: "\ufffd", 43: " "}
    vocab = {word: i for word, i in words.items() if i not in special} | {word: i for i, word in special.items()}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def test_fold_table_joins_case_and_space_forms_only():
    from modeling_memoryllm.variant_ranked import fold_table

    folds = fold_table(word_tokenizer(), 70)
    expected = torch.arange(70)
    expected[[40, 41]] = 21  # "paris" and " PARIS" are "Paris"; the rest (special, "\ufffd", " ", ids >= 64) alone
    torch.testing.assert_close(folds, expected)


def test_chunk_relevance_counts_a_group_of_forms_once():
    from modeling_memoryllm.variant_ranked import chunk_relevance

    rows, chunks, ids = torch.eye(6), torch.tensor([1, 1, 2, 2, 3, -1]), torch.tensor([1, 2, 3])
    # query token 0 has the forms 0 and 1 (both in chunk 1: counted once), token 1 the form 4 (chunk 3)
    relevance = chunk_relevance(rows, chunks, ids, torch.eye(6)[[0, 1, 4]], torch.tensor([0, 0, 1]))
    idf = torch.log1p(torch.tensor((3 - 1 + 0.5) / (1 + 0.5)))
    torch.testing.assert_close(relevance, torch.stack([idf, torch.tensor(0.0), idf]))


@torch.no_grad()
def test_a_folded_query_reads_the_chunk_that_holds_another_case_of_its_token():
    folded, exact = relevant(read_match="folded"), relevant()
    folded.tokenizer = word_tokenizer()
    state = folded.new_memory_state()
    folded.inject([[10, 11, 12], [20, 21, 22], [30, 31, 32]], memory=state)  # the second text holds "Paris"
    ids = torch.tensor([[5, 40, 6]])  # asks about "paris"
    torch.testing.assert_close(folded(ids, memory=state).logits, read_by_hand(folded, state, ids, [2]))
    # Matched exactly, "paris" is in no chunk: the whole memory is read.
    torch.testing.assert_close(exact(ids, memory=state).logits, relevant(memory_read="all")(ids, memory=state).logits)
    torch.testing.assert_close(
        folded(torch.tensor([[5, 31, 6]]), memory=state).logits,
        read_by_hand(folded, state, torch.tensor([[5, 31, 6]]), [3]),
    )  # exact forms still match


@torch.no_grad()
def test_a_folded_read_without_a_tokenizer_matches_exactly(caplog):
    model = relevant(read_match="folded")
    state = model.new_memory_state()
    model.inject([[10, 11, 12], [20, 21, 22], [30, 31, 32]], memory=state)
    ids = torch.tensor([[5, 40, 6], [5, 21, 6]])
    torch.testing.assert_close(model(ids, memory=state).logits, relevant()(ids, memory=state).logits)
    with pytest.raises(ValueError, match="read_match"):
        relevant(read_match="words")


class _NoTokenizer:
    pad_token_id, eos_token_id = 0, 2


@torch.no_grad()
def test_continuation_scores_choose_what_the_memory_reads_from_the_prompt_alone():
    from eval.runners import common

    model = relevant()
    state = model.new_memory_state()
    model.inject([[10, 11, 12], [20, 21, 22], [30, 31, 32]], memory=state)
    prompts, targets = [[5, 21], [7, 8, 31]], [[31, 32, 9], [40]]  # row 0's target names the third text
    subject = common.Subject(model, _NoTokenizer(), "tiny", "tiny", True)
    scores = common.continuation_scores(subject, prompts, targets, [state, state])
    for row, chunk in enumerate([2, 3]):  # each prompt's own chunk, whatever its target holds
        ids = torch.tensor([prompts[row] + targets[row]])
        log_probs = read_by_hand(model, state, ids, [chunk]).log_softmax(-1)[0]
        start = len(prompts[row]) - 1
        wanted = torch.tensor(targets[row])
        expected = log_probs[torch.arange(start, start + len(wanted)), wanted]
        torch.testing.assert_close(torch.tensor(scores[row][0]), expected, rtol=1e-4, atol=1e-5)
        assert scores[row][1] == (log_probs[start : start + len(wanted)].argmax(-1) == wanted).tolist()


@torch.no_grad()
def test_reading_every_row_is_what_a_static_export_serves():
    from modeling_memoryllm.export import reading_every_row

    model = relevant()
    state = model.new_memory_state()
    model.inject([[10, 11, 12], [20, 21, 22], [30, 31, 32]], memory=state)
    ids = torch.tensor([[5, 21, 6]])
    chosen = model(ids, memory=state).logits
    with reading_every_row(model):
        every = model(ids, memory=state).logits
    torch.testing.assert_close(every, relevant(memory_read="all")(ids, memory=state).logits)
    assert model.config.memory_read == "relevant" and model.variant.reads_per_query
    torch.testing.assert_close(model(ids, memory=state).logits, chosen)
    assert not torch.allclose(every, chosen, atol=1e-3)


# ------------------------------------------------------------------------------------------- archive_rows
TEXTS = [[10 * t, 10 * t + 1, 10 * t + 2] for t in range(1, 9)]  # 8 texts of 3 rows into a memory of 16 rows


def archived(**options):
    model = relevant(archive_rows=64, **options)
    state = model.new_memory_state()
    model.inject(TEXTS, memory=state)
    return model, state


def chunk_rows(model, text) -> torch.Tensor:
    """The rows `[L, n, d]` that `text` writes into a new memory (each text is written on its own)."""
    alone = model.new_memory_state()
    model.inject(text, memory=alone)
    return alone.memory[:, alone.provenance[0] == 1]


def at_the_end(model, rows: torch.Tensor) -> MemoryState:
    """A plain memory holding only `rows` `[L, n, d]`, in its last slots (the training-free rule reads no others)."""
    memory = torch.zeros_like(model.memory_state.memory)
    memory[:, -rows.shape[1] :] = rows
    provenance = torch.full(memory.shape[:2], -1)
    provenance[:, -rows.shape[1] :] = 1
    return MemoryState(memory, True, provenance, 1)


def test_archive_options_are_checked():
    assert tiny_config(memory_variant="training-free-ranked").archive_rows == 0
    with pytest.raises(ValueError, match="memory_read"):
        tiny_config(memory_variant="training-free-ranked", drop_memory_per_layer=False, archive_rows=64)
    with pytest.raises(ValueError, match="hold read_chunks"):
        relevant(archive_rows=3)


@torch.no_grad()
def test_the_archive_keeps_every_chunk_whole_up_to_its_size():
    model, state = archived()
    assert [number for number, _ in state.archive] == list(range(1, 9))
    for number, text in enumerate(TEXTS, start=1):
        torch.testing.assert_close(state.archived_chunk(number), chunk_rows(model, text))
    assert int((state.provenance[0] == 1).sum()) < 3  # the first text lost rows to the drop
    small = relevant(archive_rows=7)
    kept = small.new_memory_state()
    small.inject(TEXTS, memory=kept)
    assert [number for number, _ in kept.archive] == [7, 8]  # the oldest chunks left: 3 + 3 rows <= 7
    torch.testing.assert_close(kept.memory, state.memory)  # the archive changes nothing in the memory
    assert state.nbytes == kept.nbytes + 6 * 3 * state.memory.shape[0] * state.memory.shape[2] * 4


@torch.no_grad()
def test_a_query_reads_a_chunk_the_memory_thinned_out_whole_from_the_archive():
    model, state = archived()
    ids = torch.tensor([[5, 11, 6]])  # asks about the first text
    reference = tiny_model(0, memory_variant="training-free", num_tokens=4, num_blocks=4, max_inject_length=4)
    whole = at_the_end(model, chunk_rows(model, TEXTS[0]))
    expected = reference(ids, memory=whole).logits
    torch.testing.assert_close(model(ids, memory=state).logits, expected)
    without = relevant()
    thinned = without.new_memory_state()
    without.inject(TEXTS, memory=thinned)
    assert not torch.allclose(without(ids, memory=thinned).logits, expected, atol=1e-3)  # what is left of it
    generated = model.generate(ids, memory=state, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, reference.generate(ids, memory=whole, max_new_tokens=4, do_sample=False))
    static = model.generate(ids, memory=state, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(static, generated)
    again = model(ids, memory=state).logits  # the memory's own cached prefix was left alone
    torch.testing.assert_close(again, expected)
    cache = model(ids, memory=state, use_cache=True).past_key_values  # only the rows read: bos and the 3 restored
    assert cache.prefix_length == 4 and cache.physical_length() == 7 and cache.get_seq_length() == 3


@torch.no_grad()
def test_a_restored_chunk_is_projected_once_per_memory_version(monkeypatch):
    from modeling_memoryllm import cache_memoryllm

    model, state = archived()
    ids = torch.tensor([[5, 11, 6]])  # the first text, thinned out
    calls = []
    project = cache_memoryllm.tail_key_values
    monkeypatch.setattr(cache_memoryllm, "tail_key_values", lambda *args: calls.append(1) or project(*args))
    first = model(ids, memory=state).logits
    assert len(calls) == model.config.num_hidden_layers and list(state.prefix.tails) == [(1,)]
    model(torch.tensor([[11, 7]]), memory=state)  # another query about the same chunk
    assert len(calls) == model.config.num_hidden_layers  # the same chunk again: its keys/values were kept
    torch.testing.assert_close(model(ids, memory=state).logits, first)
    model.inject([[90, 91, 92]], memory=state)  # a new memory version: computed again
    model(ids, memory=state)
    assert len(calls) == 2 * model.config.num_hidden_layers


@torch.no_grad()
def test_the_chunks_a_query_chooses_among_are_gathered_once_per_memory_version(monkeypatch):
    model, state = archived()
    calls = []
    gather = TrainingFreeRanked.candidate_rows
    monkeypatch.setattr(TrainingFreeRanked, "candidate_rows", lambda self, s: calls.append(1) or gather(self, s))
    ids = torch.tensor([[5, 11, 6]])
    model(ids, memory=state)
    torch.testing.assert_close(
        model(torch.tensor([[5, 81, 6]]), memory=state).logits,
        read_by_hand(model, state, torch.tensor([[5, 81, 6]]), [8]),
    )
    assert len(calls) == 1
    model.inject([[90, 91, 92]], memory=state)  # a new version: the new chunk is a candidate
    torch.testing.assert_close(
        model(torch.tensor([[5, 91, 6]]), memory=state).logits,
        read_by_hand(model, state, torch.tensor([[5, 91, 6]]), [9]),
    )
    assert len(calls) == 2
    model(ids, memory=state)
    assert len(calls) == 2


@torch.no_grad()
def test_a_batch_restores_per_row_and_an_intact_chunk_is_read_in_place():
    model, state = archived()
    ids = torch.tensor([[5, 11, 6], [81, 7, 82]])  # the first text (thinned out), the last (intact)
    batch = model(ids, memory=state).logits
    torch.testing.assert_close(batch[:1], model(ids[:1], memory=state).logits)
    torch.testing.assert_close(batch[1:], read_by_hand(model, state, ids[1:], [8]))


@torch.no_grad()
def test_files_keep_the_archive(tmp_path):
    model, state = archived()
    state.save(tmp_path / "memory.safetensors", model.config)
    loaded = RankedMemoryState.load(tmp_path / "memory.safetensors", config=model.config)
    assert [number for number, _ in loaded.archive] == [number for number, _ in state.archive]
    for (_, mine), (_, theirs) in zip(state.archive, loaded.archive):
        torch.testing.assert_close(theirs, mine)
    ids = torch.tensor([[5, 11, 6]])
    torch.testing.assert_close(model(ids, memory=loaded).logits, model(ids, memory=state).logits)
    from modeling_memoryllm.memory_state_ranked import _archive_of

    tensors, _ = state.file_contents()
    tensors["archive_chunks"][1, 0] += 1  # counts that do not add up to the rows
    with pytest.raises(ValueError, match="add up"):
        _archive_of("memory.safetensors", tensors, state.memory)


def test_a_value_derived_from_the_memory_is_kept_until_the_memory_changes_and_not_copied():
    import copy

    state = MemoryState(torch.zeros(2, 4, 3))
    computed = []

    def compute():
        computed.append(1)
        return state.memory.sum() + len(computed)

    first = state.derived(("total",), compute)
    assert state.derived(("total",), compute) is first and len(computed) == 1
    twin = copy.deepcopy(state)
    assert twin._derived == {} and twin.derived(("total",), lambda: torch.tensor(-1.0)) == -1
    state.memory += 1
    state.mark_changed()
    assert state.derived(("total",), compute) == 24 + 2 and len(computed) == 2
