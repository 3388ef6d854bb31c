"""OpMixSampler: the sampler a training loop draws from, with pushes applied at a step.

    sampler = OpMixSampler.from_shards(shards, shards.uniform(), rows_per_step=16, seed=0)
    batch, _ = sampler.next_batch(16)          # or iterate it: one row per item (a torch IterableDataset)
    step = sampler.push(winner)                # the winner applies from the first step not drawn yet
    state = sampler.state_dict()               # plain JSON: load_state_dict(state) continues the same draws

It is data/sampler.py's MixtureSampler (largest-deficit draws, repetition caps) plus what a loop
needs around it: a row counter that says which step a row belongs to, the push-at-step rule, and a
resume state in torchdata's StatefulDataLoader convention. opmix-ray's own main run draws through
it as well, so a push lands at a step the same way in both.

A loader may draw ahead of the step being trained (the Hugging Face Trainer's accelerate loader
holds one batch in hand). A push therefore never changes rows already drawn: it applies at the
first step none of whose rows is drawn yet, and `push` returns that step. For the same reason the
sampler keeps its state as it was at the start of each of the last few steps (`state_dict(step=g)`),
so a checkpoint taken at step g resumes with step g's rows, not with the rows drawn ahead.

Rows are token windows of the token shards opmix-ray builds, or, for map-style datasets
(`from_datasets`), examples: each example then counts as one unit of weight, so the weights are
over tokens when the examples have equal length (packed sequences).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import IterableDataset

from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.errors import DataError
from opmix_ray.mixture import Mixture

STATE_VERSION = 1
KEEP_SNAPSHOTS = 4  # steps whose start state is kept: a loader draws at most a step or so ahead


class OpMixSampler(MixtureSampler, IterableDataset):
    """Draws rows by the current weights; `push` switches them at a step boundary."""

    def __init__(self, train: dict[str, np.ndarray], mixture: Mixture, seq_len: int,
                 cap_tokens: dict[str, float] | None = None, seed: int = 0, rows_per_step: int | None = None,
                 examples: dict | None = None):
        super().__init__(train, mixture, seq_len, cap_tokens, seed)
        self.examples = examples  # None: rows are token windows; else {domain: map-style dataset}
        self.rows_per_step = rows_per_step
        self.rows_drawn = 0
        self.pushes: list[dict] = []  # {"key", "at_step", "weights", "applied"}, in push order
        self._snapshots: dict[int, tuple] = {}

    @classmethod
    def from_shards(cls, shards, mixture: Mixture, cap_tokens: dict[str, float] | None = None, seed: int = 0,
                    rows_per_step: int | None = None) -> OpMixSampler:
        """Over the token shards opmix-ray builds (data/read.py): each row a window of seq_len + 1 tokens."""
        return cls(shards.train, mixture, shards.seq_len, cap_tokens, seed, rows_per_step)

    @classmethod
    def from_datasets(cls, datasets: dict, mixture: Mixture, max_epochs: dict[str, float] | float = np.inf,
                      seed: int = 0, rows_per_step: int | None = None) -> OpMixSampler:
        """Over map-style datasets ({domain: dataset with __len__ and __getitem__}): each row one example."""
        sizes = {}
        for d in mixture.domains:
            try:
                sizes[d] = len(datasets[d])
            except TypeError:
                raise DataError(f"sampler: the dataset of domain '{d}' has no len() (fix: give map-style "
                                "datasets, or let opmix-ray build token shards from data.path)") from None
            if sizes[d] < 2:
                raise DataError(f"sampler: the dataset of domain '{d}' has {sizes[d]} examples (fix: at least 2)")
        caps = {d: sizes[d] * (max_epochs.get(d, np.inf) if isinstance(max_epochs, dict) else max_epochs)
                for d in mixture.domains}
        # An example is a window of one "token" over the indices 0..n-1: MixtureSampler then draws
        # examples exactly as it draws windows (deficit, caps, a seeded order per epoch).
        index = {d: np.arange(sizes[d] + 1, dtype=np.int64) for d in mixture.domains}
        return cls(index, mixture, 1, caps, seed, rows_per_step, examples=dict(datasets))

    # --- steps and pushes ---
    @property
    def next_step(self) -> int:
        """The first step none of whose rows has been drawn."""
        rps = self._rps()
        return -(-self.rows_drawn // rps)

    def push(self, mixture: Mixture, key=None, at_step: int | None = None) -> int:
        """Switch to `mixture` from `at_step` (default and earliest: `next_step`); returns that step.
        A key already pushed is not pushed again (a resumed loop re-sends the pushes it recorded)."""
        mixture.check_compatible(self.domains)
        for p in self.pushes:
            if key is not None and p["key"] == key:
                return p["at_step"]
        first = self.next_step
        at = first if at_step is None else int(at_step)
        if at < first:
            raise ValueError(f"sampler: a push for step {at} comes after that step's rows were drawn (fix: push "
                             f"for step {first} or later)")
        self.pushes.append({"key": key, "at_step": at, "weights": mixture.as_dict(), "applied": False})
        if at == first and self.rows_drawn % self._rps() == 0:
            self._apply_due(at)  # nothing of that step is drawn yet: switch now, as the main run always has
        return at

    def _rps(self) -> int:
        if not self.rows_per_step:
            raise ValueError("sampler: rows_per_step is not set (fix: pass rows_per_step, the global batch in "
                             "rows per optimizer step, or let OpMixCallback / OpMixLoop set it)")
        return self.rows_per_step

    def _apply_due(self, step: int) -> None:
        for p in self.pushes:
            if not p["applied"] and p["at_step"] <= step:
                self.set_mixture(Mixture.from_dict(p["weights"], self.domains, self.mixture.data_hash))
                p["applied"] = True

    def _next_row(self) -> tuple[object, int]:
        rps = self._rps()
        if self.rows_drawn % rps == 0:
            step = self.rows_drawn // rps
            self._snapshots[step] = self._snapshot()
            self._snapshots.pop(step - KEEP_SNAPSHOTS, None)
            self._apply_due(step)
        window, i = self.draw_row()
        self.rows_drawn += 1
        if self.examples is None:
            return window, i
        return self.examples[self.domains[i]][int(window[0])], i

    def next_batch(self, batch_size: int):
        """(rows, domain index per row): rows are int64 windows [B, seq_len + 1], or a list of examples."""
        if self.rows_per_step is None:
            self.rows_per_step = batch_size  # a loop that draws one batch per step
        rows, which = zip(*(self._next_row() for _ in range(batch_size)))
        if self.examples is None:
            return np.stack(rows).astype(np.int64), np.asarray(which)
        return list(rows), np.asarray(which)

    def __iter__(self):
        """One row per item, forever: {"input_ids", "labels"} tensors of a window (a causal LM shifts
        the labels itself), or the dataset's own example."""
        while True:
            row, _ = self._next_row()
            if self.examples is None:
                ids = torch.from_numpy(row.astype(np.int64))
                yield {"input_ids": ids, "labels": ids.clone()}
            else:
                yield row

    # --- resume: torchdata's StatefulDataLoader convention, plain JSON ---
    def _snapshot(self) -> tuple:
        meta, arrays = self.get_state()  # window orders are replaced at an epoch, never changed in place
        return meta, arrays, self.rows_drawn, copy.deepcopy(self.pushes)

    def _state_at(self, step: int | None) -> tuple:
        if step is None:
            return self._snapshot()
        if step in self._snapshots:
            return self._snapshots[step]
        if self.rows_per_step and self.rows_drawn == step * self.rows_per_step:
            return self._snapshot()  # step g has not begun: now is its start
        raise ValueError(f"sampler: no state kept for step {step} (kept: {sorted(self._snapshots)}) (fix: save "
                         "within a few steps of drawing)")

    def state_dict(self, step: int | None = None) -> dict:
        """Everything the next draws depend on, as JSON-able values: now, or (step=g) as it was when
        step g's first row was drawn, for a loader that draws ahead (kept for the last few steps)."""
        meta, arrays, rows, pushes = self._state_at(step)
        return {"version": STATE_VERSION, "kind": "tokens" if self.examples is None else "examples",
                "rows_per_step": self.rows_per_step, "rows_drawn": rows, "pushes": copy.deepcopy(pushes),
                "sampler": meta, "orders": {k: [int(x) for x in v] for k, v in arrays.items()}}

    def counters_at(self, step: int) -> dict:
        """What the sampler had drawn when step `step` began (a round boundary's report): the mixture,
        the segment's drawn shares, drawn units per domain (tokens, or examples) and epochs."""
        meta = self._state_at(step)[0]
        seg, total = meta["drawn_segment"], meta["drawn_total"]
        n = sum(seg.values()) or 1
        return {"mixture": dict(meta["mixture"]), "drawn": {d: seg[d] / n for d in seg},
                "drawn_total": dict(total),
                "epochs": {d: total[d] / max(1, len(self.streams[d].tokens) - (self.examples is not None))
                           for d in total}}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where state_dict() was taken."""
        kind = "tokens" if self.examples is None else "examples"
        if state.get("version") != STATE_VERSION or state.get("kind") != kind:
            raise ValueError(f"sampler: the state is not an OpMixSampler {kind} state of version {STATE_VERSION} "
                             "(fix: load a state this sampler's state_dict() wrote)")
        self.set_state(state["sampler"], {k: np.asarray(v, dtype=np.int64) for k, v in state["orders"].items()})
        self.rows_per_step = state["rows_per_step"] or self.rows_per_step
        self.rows_drawn = int(state["rows_drawn"])
        self.pushes = copy.deepcopy(state["pushes"])
        self._snapshots = {}
