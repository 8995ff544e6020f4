"""
`training-free-ranked`: the training-free memory (layer `l` stores its own input rows of the text, so the memory is
a compressed key/value cache that an untrained backbone reads), with two changes for a memory that fills up:

* **Each text on its own.** An injection reads only the rows of the text it continues, never older texts: the
  chunk before it when that chunk filled a whole `max_inject_length` chunk (the text may go on), else nothing but
  bos. The rows of a text are then its own key/value cache from bos, whatever was injected before it; chunks of
  one text still read each other. (A separate text that happens to follow a text of exactly a multiple of
  `max_inject_length` tokens reads that text's last chunk as context.)
* **Keep what the text attended to.** Every new row gets a score: its rank, within the chunk that wrote it and in
  its own layer, by the attention it received from the chunk's tokens (as key/value cache compressors such as H2O
  and SnapKV rank cached tokens). Once the memory is full, each injection drops the rows with the lowest scores
  (the older row first among equals), in every layer apart, instead of uniformly at random. Every chunk then keeps
  its best-attended rows, and old texts thin out evenly instead of fading at random.

Config options (read from the config; defaults in brackets):
    memory_drop (`"attention"`): `"attention"` (the ranked drop above) or `"random"` (the training-free rule's
        uniform draw, e.g. to compare).
    attention_score (`"mean"`): how received attention is summed: `"mean"`, the mean over the later tokens of the
        chunk of their attention to the row relative to uniform attention (so early rows are not favoured for
        being seen by more tokens); `"sum"`, the plain sum (H2O); `"window"`, the sum over the chunk's last
        `attention_window` tokens (SnapKV's observation window).
    attention_window (`32`): see `"window"`.
    attention_pool (`1`): max-pool the scores over this many neighbouring rows (odd; SnapKV pools to keep a kept
        token's neighbours).
    text_context (`"own"`): `"own"` (each text on its own, above) or `"window"` (an injection reads the last rows of
        the memory, as the training-free rule does; the ranked drop stays).
    memory_read (`"all"`): `"all"` (a query reads every visible row) or `"relevant"`: each query reads only bos and
        the rows of the `read_chunks` chunks (one injection each) whose text shares the most of its rare tokens
        (`relevant_read`): the texts in memory do not distract it from the one it asks about. Chosen at the query's
        prefill from its own tokens (in `generate`, the prompt), and kept for the tokens that follow; every row is
        read where no chunk shares a token. Needs `drop_memory_per_layer=False` (a chunk's rows then sit at the
        same slots of every layer).
    read_chunks (`2`): see `"relevant"`.
    read_match (`"exact"`): how `"relevant"` matches a query's tokens with a chunk's: `"exact"` (the same token) or
        `"folded"` (the same text once stripped of spaces and case-folded, so a lowercase question such as NQ's "who
        founded kestrelmoor ship museum" matches " Kestrelmoor" and "Ship"; `fold_table`, from `model.tokenizer`).
        A query given as `inputs_embeds`, or a model without a tokenizer, matches exactly.
    archive_rows (`0`): with `memory_read="relevant"`, keep every chunk written whole in a CPU archive of up to this
        many rows per layer (the oldest chunks leave first; 0: none), as M+ keeps the rows its memory drops. A query
        then chooses among every chunk the memory or the archive holds, and one whose chunk lost rows to the drop
        (or left the memory) reads it whole from the archive, at the prefix's last positions, in this query's cache only
        (`QueryRead.tail_rows`, its keys/values projected once per memory version: `QueryRead.tail_keys`); the memory
        itself and its cached prefix stay as they are.

The default cache (`MemoryPrefixCache`) then holds only the rows a query reads (`cache_memoryllm.attach_read_rows`).

The released rules (`memoryllm-8b`, `memoryllm-7b`, `training-free`) are untouched.
"""

import contextlib

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
from transformers.utils import logging

from .lora import active_adapter
from .memory_state import EMPTY_ROWS, MemoryUpdate
from .memory_state_ranked import UNKNOWN_SCORE, VARIANT, RankedMemoryState
from .variants import InjectionPlan, QueryRead, TrainingFree, register_variant


logger = logging.get_logger(__name__)

DROPS = ("attention", "random")
SCORES = ("mean", "sum", "window")
DEFAULT_OPTIONS = {
    "memory_drop": "attention",
    "text_context": "own",
    "attention_score": "mean",
    "attention_window": 32,
    "attention_pool": 1,
    "memory_read": "all",
    "read_chunks": 2,
    "archive_rows": 0,
    "read_match": "exact",
}
READS = ("all", "relevant")
MATCHES = ("exact", "folded")
CONTEXTS = ("own", "window")  # "own" by default: with "window", the default given the demo passage twice answered
# every demo question with "The island itself has no trees." (the second copy read the first one's last rows)


@register_variant
class TrainingFreeRanked(TrainingFree):
    """Training-free rows; each text read on its own; a full memory drops its least-attended rows first."""

    name = VARIANT
    state_class = RankedMemoryState

    @classmethod
    def adapt_config(cls, config) -> None:
        """Fill in the options; a chunk is stored whole (`max_inject_length` at most `num_tokens`)."""
        for key, value in DEFAULT_OPTIONS.items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)
        choices = ((config.memory_drop, DROPS), (config.attention_score, SCORES), (config.text_context, CONTEXTS))
        if any(value not in allowed for value, allowed in choices):
            raise ValueError(
                f"memory_drop must be one of {DROPS}, attention_score one of {SCORES}, text_context one of {CONTEXTS}"
            )
        if int(config.attention_pool) < 1 or int(config.attention_pool) % 2 == 0 or int(config.attention_window) < 1:
            raise ValueError("attention_pool must be odd and >= 1, attention_window >= 1")
        if config.memory_read not in READS or int(config.read_chunks) < 1 or config.read_match not in MATCHES:
            raise ValueError(f"memory_read must be one of {READS}, read_chunks >= 1, read_match one of {MATCHES}")
        if config.memory_read == "relevant" and config.drop_memory_per_layer:
            raise ValueError('memory_read="relevant" needs drop_memory_per_layer=False (chunks at the same slots)')
        config.max_inject_length = min(config.max_inject_length, config.num_tokens)
        cls.check_archive(config)

    @classmethod
    def check_archive(cls, config) -> None:
        """An archive serves the relevant read, and holds at least the chunks a query reads (which fit the memory)."""
        rows, chunks = int(config.archive_rows), int(config.read_chunks)
        if rows == 0:
            return
        if config.memory_read != "relevant":
            raise ValueError('archive_rows > 0 needs memory_read="relevant" (the archive serves the chunks it reads)')
        if rows < chunks * config.max_inject_length or chunks * config.max_inject_length > cls.memory_rows(config):
            raise ValueError("archive_rows must hold read_chunks chunks, and read_chunks chunks must fit the memory")

    @property
    def writes_texts_apart(self) -> bool:
        """Whether every text is written on its own (`text_context="own"`): framed texts then each carry their own
        opening (`serving.continues_turn`)."""
        return self.config.text_context == "own"

    # ---------------------------------------------------------------------------------------------- injection
    def injection_plan(self, initialized: bool, length: int) -> InjectionPlan:
        return InjectionPlan(min(self.config.num_tokens, length), 0, True, True)  # bos is always read

    def continues_text(self, state) -> bool:
        """Whether the next injection reads rows of the memory: with `text_context="window"` whenever there are any;
        else when it continues the last one (which filled a whole chunk)."""
        if state.injections == 0:
            return False
        if self.config.text_context == "window":
            return True
        return int((state.provenance[0] == state.injections).sum()) == self.config.max_inject_length

    def prefix_written(self, state, rows: slice = slice(None)) -> torch.Tensor | None:
        """For reading (all rows), the written rows but repeated ones (see `repeated_rows`), and bos; for an
        injection's window of rows, only the rows of the text it continues (see `continues_text`), and bos."""
        if rows == slice(None):
            visible = self.visible(state)
            if bool(visible.all()):
                return None
            return torch.cat([torch.ones(1, dtype=torch.bool), visible]) if self.config.add_bos_embedding else visible
        window = state.provenance[0, rows]
        if self.config.text_context == "window":
            return super().prefix_written(state, rows)
        visible = window == state.injections if self.continues_text(state) else torch.zeros_like(window, dtype=bool)
        visible = visible & (window != EMPTY_ROWS)
        return torch.cat([torch.ones(1, dtype=torch.bool), visible]) if self.config.add_bos_embedding else visible

    # ------------------------------------------------------------------------------------------------ reading
    @property
    def reads_per_query(self) -> bool:
        return self.config.memory_read == "relevant"

    @contextlib.contextmanager
    def reading_every_row(self):
        """Within it, the config reads `memory_read="all"` (restored after)."""
        chosen, self.config.memory_read = self.config.memory_read, "all"
        try:
            yield
        finally:
            self.config.memory_read = chosen

    def query_read(self, model, states, input_ids, inputs_embeds, attention_mask) -> QueryRead | None:
        """With `memory_read="relevant"`, per batch row, bos and the rows of its query's most relevant chunks
        (`relevant_read`); `None` when every row reads all (`memory_read="all"`, or nothing matched)."""
        if not self.reads_per_query:
            return None
        folds = token_folds(model) if input_ids is not None and self.config.read_match == "folded" else None
        rows = None if folds is not None else first_layer_rows(model, input_ids, inputs_embeds)  # [B, T, d]
        reads, tails, keys = [], [], []
        for row in range(len(input_ids if input_ids is not None else inputs_embeds)):
            kept = slice(None) if attention_mask is None else attention_mask[row].bool()
            if folds is None:
                tokens, groups = rows[row][kept], None  # [T_row, d]
            else:
                tokens, groups = folded_query(model, folds, input_ids[row][kept])  # [m, d], [m]
            read, tail = self.relevant_read(states[row if len(states) > 1 else 0], tokens, groups)
            reads.append(read)
            tails.append(None if tail is None else tail[1])
            keys.append(None if tail is None else tail[0])
        if all(read is None for read in reads):
            return None
        every = torch.ones(self.prefix_length(self.config), dtype=torch.bool)
        read = torch.stack([read if read is not None else every for read in reads])
        restores = any(tail is not None for tail in tails)
        return QueryRead(read, tails if restores else None, keys if restores else None)

    def relevant_read(self, state, query_rows: torch.Tensor, groups: torch.Tensor | None = None) -> tuple:
        """`([P] bool, rows)`: bos and the rows of the `read_chunks` chunks that best match `query_rows` `[T, d]`
        (`chunk_relevance`, above 0; `groups`: see there), and `None`, or where one of those chunks lost rows that
        the archive holds, `(chunks, rows)`: their numbers and the chunks whole `[L, n, d]` (`restored_chunks`),
        with the last `n` prefix rows to read them in. `None` (all) when the memory and archive hold no more chunks
        than that, or none matches."""
        if not self.reads(state):
            return None, None
        first_rows, owners, ids = self.read_candidates(state)  # [R, d], [R], [C]
        if len(ids) <= self.config.read_chunks:
            return None, None
        relevance = chunk_relevance(first_rows, owners, ids, query_rows, groups)  # [C]
        best = relevance.topk(int(self.config.read_chunks))
        chosen = ids[best.indices[best.values > 0].cpu()].sort().values
        if len(chosen) == 0:
            return None, None
        bos = torch.ones(int(self.config.add_bos_embedding), dtype=torch.bool)
        tail = self.restored_chunks(state, chosen)
        if tail is not None:
            rows = state.memory.shape[1]
            return torch.cat([bos, torch.arange(rows) >= rows - tail.shape[1]]), (tuple(chosen.tolist()), tail)
        return torch.cat([bos, torch.isin(state.provenance[0], chosen) & self.visible(state)]), None

    def read_candidates(self, state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`candidate_rows` and the chunk numbers among them `[C]` ascending. Outside autograd they are kept on
        `state` for its memory version (`MemoryState.derived`), so that a prefill does not gather the archive's rows
        again."""

        def candidates():
            rows, owners = self.candidate_rows(state)  # [R, d], [R]
            return rows, owners, owners[owners != EMPTY_ROWS].unique()

        if torch.is_grad_enabled() and state.memory.requires_grad:
            return candidates()
        return state.derived(("read_candidates", state.memory.device), candidates)

    def candidate_rows(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer-0 rows `[R, d]` of every chunk a query may choose, and the chunk of each `[R]`: the archive's
        chunks whole, then the memory's rows of chunks the archive does not hold (never-written rows: -1)."""
        chunks = state.provenance[0]  # [M] the injection that wrote each row (aligned in every layer)
        archive = getattr(state, "archive", [])
        if not archive:
            return state.memory[0], chunks
        numbers = torch.tensor([number for number, _ in archive])
        in_memory = ~torch.isin(chunks, numbers)
        rows = [chunk[0].to(state.memory.device, state.memory.dtype) for _, chunk in archive]
        owners = [torch.full((chunk.shape[1],), number) for number, chunk in archive]
        memory_rows = state.memory[0][in_memory.to(state.memory.device)]
        return torch.cat([*rows, memory_rows]), torch.cat([*owners, chunks[in_memory]])

    def restored_chunks(self, state, chosen: torch.Tensor) -> torch.Tensor | None:
        """The `chosen` chunks whole, oldest first, `[L, n, d]` (from the archive; the memory's rows of a chunk it does
        not hold), where the memory lacks some row of one of them that the archive holds; else `None`."""
        archived = [state.archived_chunk(int(number)) for number in chosen] if getattr(state, "archive", None) else []
        in_memory = [int((state.provenance[0] == number).sum()) for number in chosen]
        if not any(rows is not None and rows.shape[1] > count for rows, count in zip(archived, in_memory)):
            return None
        parts = [
            rows.to(state.memory.device, state.memory.dtype)
            if rows is not None
            else state.memory[:, (state.provenance[0] == number).to(state.memory.device)]
            for number, rows in zip(chosen.tolist(), archived)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # one chunk: the archive's own rows, no copy

    # ------------------------------------------------------------------------------------------------- update
    def visible(self, state) -> torch.Tensor:
        """`[M]` bool: the rows a query reads: written and not repeated (the same in every layer: repeated rows are
        written at the same slots of every layer and dropped first, so they stay aligned)."""
        return (state.provenance[0] != EMPTY_ROWS) & (state.scores[0] >= 0)

    def planned_update(self, state, delta: torch.Tensor, injection: int, generator=None, model=None) -> MemoryUpdate:
        """Write `delta` `[L, n, d]` (never-written rows first); once full, drop repeated rows, then by score (or
        at random). The rows' new scores travel with the update (`MemoryUpdate.scores`), applied in place."""
        scores = self.write_scores(model, delta)
        first_last = state.memory[[0, -1]].to(delta.device, delta.dtype)
        scores = self.marked(first_last, self.visible(state), delta[[0, -1]], scores)
        return self.planned(state, delta, scores, injection, generator)

    @staticmethod
    def marked(first_last: torch.Tensor, visible: torch.Tensor, new: torch.Tensor, scores: torch.Tensor):
        """`scores` with the new rows that repeat a visible row set to -1 (`repeated_rows`; `first_last` and `new`
        are the first and last layers' rows `[2, M, d]`, `[2, n, d]`)."""
        repeated = repeated_rows(first_last, visible, new)
        if bool(repeated.any()):
            scores = scores.clone()
            scores[:, repeated.cpu()] = -1.0
        return scores

    def write_scores(self, model, delta: torch.Tensor) -> torch.Tensor:
        """The scores `[L, n]` of the rows `delta` writes (`row_scores`; unknown, 0.5, for the random drop)."""
        if self.config.memory_drop == "random":
            return torch.full(delta.shape[:2], UNKNOWN_SCORE)
        if model is None:
            raise ValueError(f"{VARIANT} ranks rows by attention: its update needs the model.")
        return row_scores(model, delta)

    def updated(self, state, delta: torch.Tensor, scores: torch.Tensor, injection: int, generator=None):
        """The new state after writing `delta` with the new rows' `scores` `[L, n]` given (e.g. computed once for a
        text written into many memories)."""
        return state.updated(self.planned(state, delta, scores, injection, generator))

    def planned(self, state, delta: torch.Tensor, scores: torch.Tensor, injection: int, generator=None):
        """The `MemoryUpdate` of `updated`."""
        new = min(delta.shape[1], state.memory.shape[1])
        delta, scores = delta[:, -new:], scores[:, -new:]
        written, keep_written, kept = self.rows_with_room(state, new)
        if kept is None and self.config.memory_drop == "random":
            kept = self.random_rows(written, state.scores[0, written] < 0, keep_written, generator)
        elif kept is None:
            kept = written[self.best_rows(state.scores[:, written], keep_written)]
        scores = state.scores_after(kept, scores)
        return MemoryUpdate(delta, injection, kept=kept, scores=scores, archive_rows=int(self.config.archive_rows))

    def random_rows(self, written: torch.Tensor, repeated: torch.Tensor, keep: int, generator) -> torch.Tensor:
        """The training-free rule's uniform draw of `keep` of the `written` rows, repeated rows dropped first (the
        newest of them stay when there are too few others)."""
        if not bool(repeated.any()):
            return written[self.kept_rows(len(written), keep, generator)]
        others, again = written[~repeated], written[repeated]
        picks = others[self.kept_rows(len(others), min(keep, len(others)), generator)]
        extra = again[len(again) - max(keep - len(others), 0) :]
        if picks.dim() == 2:
            extra = extra.expand(picks.shape[0], -1)
        return torch.cat([picks, extra], dim=-1).sort(dim=-1).values

    def best_rows(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Ascending indices of the `keep` highest-scored rows, `[L, keep]` per layer or `[keep]` shared (summed
        scores); among equal scores the later (newer) row stays."""
        if not self.drops_per_layer(self.config):
            scores = scores.sum(0, keepdim=True)
        order = torch.arange(scores.shape[1], dtype=torch.float32) / (10.0 * scores.shape[1])  # tie-break: newer
        picks = torch.topk(scores + 1e-3 * order, keep, dim=1).indices.sort(dim=1).values
        return picks if self.drops_per_layer(self.config) else picks[0]


# ----------------------------------------------------------------------------------------------------- scores
def repeated_rows(first_last: torch.Tensor, visible: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`[n]` bool: the `new` rows that repeat one of the `visible` rows: the same token (equal first-layer rows) after
    the same tokens (close last-layer rows). With each text written on its own, this is the opening that every
    framed text shares (`serving.Framing.text_head`): the memory reads it once."""
    old = first_last[:, visible.to(first_last.device)]
    repeated = torch.zeros(new.shape[1], dtype=torch.bool)
    fresh, seen = equal_rows(old[0], new[0])  # same token
    same = torch.isclose(new[1, fresh], old[1, seen], rtol=1e-3, atol=1e-3).all(-1)  # after the same tokens
    repeated[fresh[same].cpu()] = True
    return repeated


def equal_rows(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs `(i, j)` with `new[i]` equal to `old[j]` (rows `[n, d]`, `[m, d]`; to float tolerance), as two index
    tensors: candidates by a projection on one probe vector, confirmed element by element."""
    none = torch.zeros(0, dtype=torch.long, device=new.device)
    if old.shape[0] == 0 or new.shape[0] == 0:
        return none, none
    probe = torch.linspace(1.0, 2.0, new.shape[-1], device=new.device, dtype=new.dtype)
    old_key, new_key = old.to(new.dtype) @ probe, new @ probe  # [m], [n]
    scale = 1e-5 * (old_key.abs().max() + 1)
    fresh, seen = ((new_key[:, None] - old_key[None]).abs() <= scale).nonzero().unbind(1)  # probably equal
    same = torch.isclose(new[fresh], old[seen].to(new.dtype), rtol=1e-5, atol=1e-6).all(-1)
    return fresh[same], seen[same]


def chunk_relevance(
    first_rows: torch.Tensor,
    chunks: torch.Tensor,
    ids: torch.Tensor,
    query_rows: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[C]` float: for each chunk in `ids` `[C]`, the summed inverse chunk frequency (BM25's idf) of the distinct
    query tokens that it wrote. Tokens are compared as layer-0 rows: `first_rows` `[M, d]` (the memory's, written by
    `chunks` `[M]`) and `query_rows` `[T, d]`; every written row counts, repeated ones too (so an opening that every
    framed text shares weighs next to nothing). With `groups` `[T]` (ascending ids from 0, one per query token), the
    query rows of one group are one token: the forms of it that `read_match="folded"` matches (`folded_query`)."""
    query_rows = query_rows.to(first_rows.dtype)
    if groups is None:
        query_rows = query_rows.unique(dim=0)  # [u, d] distinct query tokens
        groups = torch.arange(query_rows.shape[0])
    token, row = (index.cpu() for index in equal_rows(first_rows.to(query_rows.device), query_rows))
    written = chunks[row] != EMPTY_ROWS  # matches in written rows only
    present = torch.zeros(int(groups.max()) + 1 if len(groups) else 0, len(ids), dtype=torch.bool)  # [u, C]
    present[groups.cpu()[token[written]], torch.searchsorted(ids, chunks[row[written]])] = True
    frequency = present.sum(1, keepdim=True).float()  # [u, 1] chunks holding each token
    idf = torch.log1p((len(ids) - frequency + 0.5) / (frequency + 0.5))
    return (present.float() * idf).sum(0)


# ----------------------------------------------------------------------------------------- read_match="folded"
def fold_table(tokenizer, size: int) -> torch.Tensor:
    """`[size]` int64: each token id's class, the smallest id whose text is the same once stripped of spaces and
    case-folded (" Paris", "Paris", " PARIS" are one class). Special tokens, ids whose text is empty once stripped
    or not whole characters (a byte-level piece of one), and ids beyond the tokenizer are their own class."""
    count = min(len(tokenizer), size)
    texts = tokenizer.batch_decode([[token] for token in range(count)])
    special = set(tokenizer.all_special_ids)
    first: dict[str, int] = {}
    folds = list(range(size))
    for token, text in enumerate(texts):
        key = text.strip().casefold()
        if key and "\ufffd" not in key and token not in special:
            folds[token] = first.setdefault(key, token)
    return torch.tensor(folds)


def token_folds(model) -> torch.Tensor | None:
    """`fold_table` of `model.tokenizer`, built once per tokenizer (kept on the model); `None`, with a warning, for
    a model without a tokenizer (its queries then match exactly)."""
    try:
        tokenizer = model.tokenizer
    except ValueError:
        logger.warning_once('read_match="folded" needs model.tokenizer; without one, queries match tokens exactly.')
        return None
    cached = getattr(model, "_token_folds", None)
    if cached is None or cached[0] is not tokenizer:
        cached = (tokenizer, fold_table(tokenizer, model.get_input_embeddings().num_embeddings))
        model._token_folds = cached
    return cached[1]


def folded_query(model, folds: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer-0 rows `[m, d]` of every token id in the class of one of the query's `ids` `[T]` (`folds` `[V]`),
    and the group of each `[m]`: the rank of its class among the query's distinct classes."""
    classes = folds[ids.cpu()].unique()  # [u] ascending
    forms = torch.isin(folds, classes).nonzero()[:, 0]  # [m] every id of those classes
    groups = torch.searchsorted(classes, folds[forms])  # [m] in [0, u)
    return first_layer_rows(model, forms[None].to(model.model.embed_tokens.weight.device))[0], groups


def first_layer_rows(model, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, T, d]`, detached: the rows an injection of these tokens writes into layer 0 (embedding + `e`), which
    `chunk_relevance` compares with the memory's."""
    embeds = inputs_embeds if inputs_embeds is not None else model.model.embed_tokens(input_ids)
    return (embeds + model.new_memory_positional_emb.to(embeds.dtype)).detach()


@torch.no_grad()
def row_scores(model, delta: torch.Tensor) -> torch.Tensor:
    """`[L, n]` float32 on the CPU: in every layer, each new row's rank in `[0, 1]` among the `n` rows by the attention
    it received from the rows after it in the chunk (bos among the keys), as `config.attention_score` sums it."""
    config = model.config
    ranks = []
    with active_adapter(config.injection_adapter):
        for idx, layer in enumerate(model.model.layers):
            weight = layer.input_layernorm.weight
            rows = delta[idx].to(weight.device, weight.dtype)
            if model.bos_embedding is not None:
                rows = torch.cat([model.bos_embedding[idx].to(rows.dtype), rows])
            received = _received_attention(model, layer, rows, config)[-delta.shape[1] :]
            if config.attention_pool > 1:
                pool = torch.nn.functional.max_pool1d
                received = pool(received[None, None], config.attention_pool, 1, config.attention_pool // 2)[0, 0]
            ranks.append(_ranks(received))
    return torch.stack(ranks).cpu()


def _received_attention(model, layer, rows: torch.Tensor, config) -> torch.Tensor:
    """`[S]`: the attention each of `rows` `[S, d]` receives from the rows at or after it (causal, all heads)."""
    attention, count = layer.self_attn, rows.shape[0]
    hidden = layer.input_layernorm(rows)[None]
    shape = (1, count, -1, attention.head_dim)
    queries = attention.q_proj(hidden).view(shape).transpose(1, 2)
    keys = attention.k_proj(hidden).view(shape).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(count, device=rows.device)[None])
    queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
    keys = repeat_kv(keys, queries.shape[1] // keys.shape[1])
    logits = (queries @ keys.transpose(-1, -2)).float() * attention.scaling  # [1, H, S, S]
    causal = torch.ones(count, count, dtype=torch.bool, device=rows.device).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)[0].sum(0)  # [S queries, S keys]
    if config.attention_score == "sum":
        return probs.sum(0)
    if config.attention_score == "window":
        return probs[-config.attention_window :].sum(0)
    seen_by = torch.arange(count, 0, -1, device=rows.device, dtype=probs.dtype)  # queries at or after each key
    relative = probs * torch.arange(1, count + 1, device=rows.device, dtype=probs.dtype)[:, None]
    return relative.sum(0) / seen_by


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank in `[0, 1]` (1: the largest); a single value ranks 1."""
    count = values.shape[0]
    ranks = torch.empty(count, dtype=torch.float32, device=values.device)
    ranks[values.float().argsort()] = torch.arange(count, dtype=torch.float32, device=values.device)
    return ranks / max(count - 1, 1) if count > 1 else torch.ones(1)


__all__ = ["TrainingFreeRanked", "repeated_rows", "row_scores"]
