"""Texts injected into many memories (retention's unrelated contexts), with their work done once.

Where the memory variant writes every text on its own (`training-free-ranked`: a text's rows depend on that text
alone, see `continues_text`), the rows that a text's chunks write are the same in every memory. `SharedTexts`
computes them once, in one memory that receives the texts in order (so a text that continues the one before reads
it, as it would anywhere), with their drop scores and their keys/values (before RoPE). A sample's memory is then
followed as a `Track`: the variant's own update runs on a stand-in memory whose rows are row numbers (so the drop
is the variant's, with the same draws of the sample's generator), and the real rows and the reading prefix are put
together from the sample's own rows and the shared ones only when the memory is read (`Track.state`). A memory
whose last text would be continued (it ended on a whole chunk), and every variant whose injections read older
texts, gets the text injected as usual.
"""

import torch
from transformers.models.llama.modeling_llama import rotate_half

from modeling_memoryllm.cache_memoryllm import SharedPrefix, reading_prefix_key
from modeling_memoryllm.lora import active_adapter


class RowKeyValues:
    """Per layer, the keys (before RoPE) and values that the reading pass computes from memory rows: a row's
    projections depend on that row alone, so a prefix can be put together from rows computed once."""

    def __init__(self, model):
        self.model = model
        self.adapter = model.config.generation_adapter

    @torch.no_grad()
    def of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[L, R, kv]` of rows `[L, R, d]` (layer `l`'s rows through layer `l`'s projections)."""
        keys, values = [], []
        with active_adapter(self.adapter):
            for idx, layer in enumerate(self.model.model.layers):
                weight = layer.input_layernorm.weight
                hidden = layer.input_layernorm(rows[idx].to(weight.device, weight.dtype))
                keys.append(layer.self_attn.k_proj(hidden))
                values.append(layer.self_attn.v_proj(hidden))
        return torch.stack(keys), torch.stack(values)

    @torch.no_grad()
    def prefix(self, keys: torch.Tensor, values: torch.Tensor, written) -> SharedPrefix:
        """The reading prefix of `[bos, rows]` from their keys and values `[L, P, kv]`: RoPE at positions `0..P-1`."""
        model = self.model
        head_dim = model.model.layers[0].self_attn.head_dim
        count = keys.shape[1]
        positions = torch.arange(count, device=keys.device)[None]
        cos, sin = model.model.rotary_emb(keys, positions)  # [1, P, hd]
        layer_keys, layer_values = [], []
        for idx in range(keys.shape[0]):
            key = keys[idx].view(1, count, -1, head_dim).transpose(1, 2)
            layer_keys.append(key * cos[:, None] + rotate_half(key) * sin[:, None])
            layer_values.append(values[idx].view(1, count, -1, head_dim).transpose(1, 2))
        return SharedPrefix(layer_keys, layer_values, written=written)

    def cache_on(self, state, prefix: SharedPrefix) -> None:
        """Keep `prefix` on `state` as the prefix that reading it computes (the key of `reading_prefix`)."""
        state.keep_prefix(reading_prefix_key(self.model), prefix)


class Track:
    """A memory followed through shared texts: its own rows (`base`), a stand-in state whose rows are row numbers
    (below `M`: a row of `base`; from `M` on: a shared row), and the keys/values of `base`'s written rows."""

    def __init__(self, shared: "SharedTexts", base):
        self.shared, self.base = shared, base
        layers, rows, _ = base.memory.shape
        self.proxy = base.with_rows(torch.arange(rows, dtype=torch.float32).expand(layers, rows)[..., None].clone())
        written = (base.provenance[0] >= 0).nonzero().squeeze(1)  # never-written rows are the same in every layer
        keys, values = shared.kv.of(base.memory[:, written])
        self.keys = keys.new_zeros(layers, rows, keys.shape[-1]).index_copy_(1, written.to(keys.device), keys)
        self.values = values.new_zeros(layers, rows, values.shape[-1]).index_copy_(1, written.to(keys.device), values)

    def first_last(self) -> torch.Tensor:
        """`[2, M, d]`: the first and the last layer's rows of the memory this track stands for."""
        numbers = self.proxy.memory[[0, -1], :, 0].long()
        return pick_rows(numbers, self.base.memory.shape[1], self.base.memory[[0, -1]], self.shared.rows[[0, -1]])

    def archive(self) -> list:
        """The archive (`archive_rows`) of the memory this track stands for: `base`'s own chunks, and views of the
        shared rows for the chunks written through the track (their rows there are row numbers)."""
        own = {id(rows) for _, rows in self.base.archive}
        chunks = []
        for number, rows in self.proxy.archive:
            if id(rows) not in own:  # row numbers of consecutive shared rows
                first = int(rows[0, 0, 0]) - self.base.memory.shape[1]
                rows = self.shared.rows[:, first : first + rows.shape[1]]
            chunks.append((number, rows))
        return chunks

    def state(self):
        """The memory this track stands for, with its reading prefix already cached."""
        shared, own_rows = self.shared, self.base.memory.shape[1]
        numbers = self.proxy.memory[..., 0].long()
        state = self.proxy.with_rows(pick_rows(numbers, own_rows, self.base.memory, shared.rows))
        if getattr(state, "archive", None):
            state.archive = self.archive()
        keys = torch.cat([shared.bos_keys, pick_rows(numbers, own_rows, self.keys, shared.keys)], dim=1)
        values = torch.cat([shared.bos_values, pick_rows(numbers, own_rows, self.values, shared.values)], dim=1)
        shared.kv.cache_on(state, shared.kv.prefix(keys, values, shared.variant.prefix_written(state)))
        return state


def pick_rows(numbers: torch.Tensor, own_rows: int, own: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """`[L, M, w]`: per layer, row `numbers[l, i]` of `own` (below `own_rows`) or of `pooled` (from `own_rows` on)."""
    out = own.new_empty(*numbers.shape, own.shape[-1])
    for layer, row_numbers in enumerate(numbers.to(own.device)):  # one gather per layer and source: no masks
        mine = row_numbers < own_rows
        slots_mine, slots_pooled = mine.nonzero().squeeze(1), (~mine).nonzero().squeeze(1)
        out[layer].index_copy_(0, slots_mine, own[layer].index_select(0, row_numbers[slots_mine]))
        picked = pooled[layer].index_select(0, (row_numbers[slots_pooled] - own_rows).to(pooled.device))
        out[layer].index_copy_(0, slots_pooled, picked.to(out.device, out.dtype))
    return out


class SharedTexts:
    """`texts` (token ids) to inject, in order, into many memories of `model`."""

    def __init__(self, model, texts: list[list[int]], share: bool = True):
        self.model, self.texts, self.variant = model, texts, model.variant
        methods = ("continues_text", "updated", "marked")
        self.enabled = share and bool(texts) and all(hasattr(self.variant, name) for name in methods)  # none: k = 0
        self.writes: list[tuple[bool, list]] = []  # per text: (shareable, [(first pool row, rows, scores)])
        self.counts = {"shared": 0, "direct": 0}  # chunk writes taken from the shared rows / computed per memory
        if self.enabled:
            self.kv = RowKeyValues(model)
            self._compute()

    @torch.no_grad()
    def _compute(self) -> None:
        """Every text's chunk rows, scores and keys/values, injected in order into one memory; a text is shareable
        when it does not continue the text before it."""
        model, size, pool = self.model, self.model.config.max_inject_length, []
        state = model.new_memory_state()
        for ids in self.texts:
            shareable, chunks = not self.variant.continues_text(state), []
            for start in range(0, len(ids), size):
                delta = model.compute_delta(torch.tensor([ids[start : start + size]], device=model.device), state)[0]
                scores = self.variant.write_scores(model, delta)
                chunks.append((sum(rows.shape[1] for rows in pool), delta.shape[1], scores))
                pool.append(delta.cpu())
                state = self.variant.updated(state, delta, scores, state.injections + 1)
            self.writes.append((shareable, chunks))
        self.rows = torch.cat(pool, dim=1)  # [L, R, d]: at least one text (`enabled`)
        self.keys, self.values = self.kv.of(self.rows)
        bos = model.bos_embedding if model.bos_embedding is not None else self.rows[:, :0]
        self.bos_keys, self.bos_values = self.kv.of(bos.detach())

    def track(self, state) -> Track | None:
        return Track(self, state) if self.enabled else None

    def inject(self, index: int, tracks: list, states: list, generators: list) -> tuple[list, list]:
        """Text `index` written into each memory: through its track where the text is shared, else injected into
        its state (all such memories in one batched call; each then starts a new track). Returns the new
        (tracks, states); a state is `None` where only its track is current."""
        shareable, chunks = self.writes[index] if self.enabled else (False, [])
        tracks, states, direct = list(tracks), list(states), []
        for row, track in enumerate(tracks):
            if track is None or not shareable or self.variant.continues_text(track.proxy):
                direct.append(row)
                continue
            for first, count, scores in chunks:
                proxy, new = track.proxy, self.rows[[0, -1], first : first + count]
                scores = self.variant.marked(track.first_last(), self.variant.visible(proxy), new, scores)
                numbers = torch.arange(first, first + count, dtype=torch.float32) + proxy.memory.shape[1]
                rows = numbers.expand(proxy.memory.shape[0], count)[..., None]
                track.proxy = self.variant.updated(proxy, rows, scores, proxy.injections + 1, generators[row])
            states[row] = None
            self.counts["shared"] += len(chunks)
        if direct:
            memories = [states[row] if states[row] is not None else tracks[row].state() for row in direct]
            with torch.no_grad():
                self.model.inject(
                    [self.texts[index]] * len(direct),
                    memory=memories,
                    generator=[generators[row] for row in direct],
                    show_progress=False,
                )
            for row, state in zip(direct, memories):
                states[row], tracks[row] = state, self.track(state)
            self.counts["direct"] += len(direct) * -(-len(self.texts[index]) // self.model.config.max_inject_length)
        return tracks, states

    def states(self, tracks: list, states: list) -> list:
        """The current memories (put together from their tracks where needed)."""
        return [state if state is not None else track.state() for track, state in zip(tracks, states)]


__all__ = ["RowKeyValues", "SharedTexts", "Track"]
