"""Mixture-weighted sampler over per-domain token streams, with repetition caps.

Weights are over tokens: every draw is one window of seq_len + 1 tokens, so choosing windows by
weight is choosing tokens by weight. Domains are picked by largest deficit (owed minus drawn
tokens) rather than at random, so the draws track the weights to within two windows from the first
batch on, and every batch holds every domain with weight >= 1 / batch_size (stratified sampling,
which a pilot on the bundled domains found hard to beat). Within a domain, windows come from a seeded permutation
with a fresh random offset each epoch.
"""
from __future__ import annotations

import numpy as np

from opmix_ray.mixture import Mixture


class _DomainStream:
    def __init__(self, tokens: np.ndarray, seq_len: int, rng: np.random.Generator):
        self.tokens, self.seq_len, self.rng = tokens, seq_len, rng
        if len(tokens) < seq_len + 2:
            raise ValueError(f"a domain has {len(tokens)} train tokens, fewer than seq_len + 2 "
                             "(fix: add data or lower data.seq_len)")
        self.epoch = 0
        self._new_epoch()

    def _new_epoch(self):
        shift = int(self.rng.integers(0, self.seq_len)) if len(self.tokens) > 2 * self.seq_len + 1 else 0
        n_win = (len(self.tokens) - 1 - shift) // self.seq_len
        self.starts = shift + self.seq_len * self.rng.permutation(n_win)
        self.pos = 0

    def next_window(self) -> np.ndarray:
        if self.pos == len(self.starts):
            self.epoch += 1
            self._new_epoch()
        s = int(self.starts[self.pos])
        self.pos += 1
        return self.tokens[s : s + self.seq_len + 1]


class MixtureSampler:
    """Draws [batch, seq_len + 1] token windows by mixture weight; counts what it really drew."""

    def __init__(self, train: dict[str, np.ndarray], mixture: Mixture, seq_len: int,
                 cap_tokens: dict[str, float] | None = None, seed: int = 0):
        self.domains = mixture.domains
        self.seq_len = seq_len
        self._seeds = np.random.default_rng(seed)  # one child seed per domain, in domain order
        self.streams = {d: _DomainStream(np.asarray(train[d]), seq_len, np.random.default_rng(self._seeds.integers(2**63)))
                        for d in self.domains}
        self.cap_tokens = {d: float((cap_tokens or {}).get(d, np.inf)) for d in self.domains}
        self.drawn_total = {d: 0 for d in self.domains}  # tokens over the run
        self.set_mixture(mixture)

    def add_domain(self, name: str, tokens: np.ndarray, cap_tokens: float = np.inf) -> None:
        """A domain that arrived in a live run; it is drawn once a mixture gives it weight. Its
        stream gets the next child seed, as if it had been listed from the start, so a resumed run
        (which builds the sampler with it) draws the same windows."""
        rng = np.random.default_rng(self._seeds.integers(2**63))
        self.streams[name] = _DomainStream(np.asarray(tokens), self.seq_len, rng)
        self.domains = (*self.domains, name)
        self.cap_tokens[name], self.drawn_total[name], self.drawn_segment[name] = float(cap_tokens), 0, 0

    def replace_domain(self, name: str, tokens: np.ndarray, cap_tokens: float = np.inf) -> None:
        """New data for a domain (a revision): a fresh stream on the next child seed; its
        repetition count starts again, since the data is new."""
        self.streams[name] = _DomainStream(np.asarray(tokens), self.seq_len,
                                           np.random.default_rng(self._seeds.integers(2**63)))
        self.cap_tokens[name], self.drawn_total[name], self.drawn_segment[name] = float(cap_tokens), 0, 0

    def set_mixture(self, mixture: Mixture) -> None:
        """Switch weights; the per-segment counters restart so draws track the new mixture. The same
        weights again (a round that decided to stay) change nothing, so a run that always stays
        draws exactly what a run on that fixed mixture draws."""
        mixture.check_compatible(self.domains)
        current = getattr(self, "mixture", None)  # None while __init__ sets the first one
        if current is not None and np.array_equal(mixture.as_array(), current.as_array()):
            self.mixture = mixture
            return
        self.mixture = mixture
        self.drawn_segment = {d: 0 for d in self.domains}

    def _effective_weights(self) -> np.ndarray:
        w = self.mixture.as_array().copy()
        for i, d in enumerate(self.domains):
            if self.drawn_total[d] + self.seq_len > self.cap_tokens[d]:
                w[i] = 0.0  # repetition cap reached: its share goes to the others
        if w.sum() <= 0:
            raise RuntimeError(f"every domain with weight > 0 hit its repetition cap {self.cap_tokens} "
                               "(fix: raise data.max_epochs or lower main.total_tokens)")
        return w / w.sum()

    def draw_row(self) -> tuple[np.ndarray, int]:
        """One window [seq_len + 1] and its domain index: the domain owed the most tokens."""
        w = self._effective_weights()
        seg = np.array([self.drawn_segment[d] for d in self.domains], dtype=np.float64)
        # owed over the domains still drawable: a capped domain's past draws must not leave the
        # others a shared deficit (argmax would then split it equally, not by weight)
        owed = w * (seg[w > 0].sum() + self.seq_len) - seg
        owed[w == 0] = -np.inf
        i = int(np.argmax(owed))
        d = self.domains[i]
        self.drawn_segment[d] += self.seq_len
        self.drawn_total[d] += self.seq_len
        return self.streams[d].next_window(), i

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [B, seq_len + 1] int64, domain index per row [B])."""
        rows, which = zip(*(self.draw_row() for _ in range(batch_size)))
        return np.stack(rows).astype(np.int64), np.asarray(which)

    def segment_fractions(self) -> dict[str, float]:
        """Share of tokens really drawn per domain since the last set_mixture."""
        total = sum(self.drawn_segment.values()) or 1
        return {d: self.drawn_segment[d] / total for d in self.domains}

    def epochs(self) -> dict[str, float]:
        return {d: self.drawn_total[d] / max(1, len(self.streams[d].tokens)) for d in self.domains}

    # --- resume (opmix-ray resume): plain JSON + arrays, never pickle ---
    def get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able counters and rng states, window orders): restoring both continues the exact
        same draws. The orders are arrays (one int per window) so a big corpus stays out of JSON."""
        meta = {"domains": list(self.domains), "mixture": self.mixture.as_dict(),
                "drawn_total": dict(self.drawn_total), "drawn_segment": dict(self.drawn_segment),
                "streams": [{"epoch": s.epoch, "pos": s.pos, "rng": s.rng.bit_generator.state}
                            for s in self.streams.values()]}
        arrays = {f"sampler.starts.{i}": np.asarray(s.starts, dtype=np.int64) for i, s in enumerate(self.streams.values())}
        return meta, arrays

    def set_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Restore get_state(). Domains added to the run after the state was saved (they come last)
        keep their fresh streams and start undrawn."""
        saved = list(meta["domains"])
        if saved != list(self.domains[: len(saved)]):
            raise ValueError(f"sampler state is for domains {saved}, not {list(self.domains)} "
                             "(fix: resume with the data the run started on)")
        mix = {d: meta["mixture"].get(d, 0.0) for d in self.domains}
        self.mixture = Mixture.from_dict(mix, self.domains, self.mixture.data_hash)
        self.drawn_total = {d: int(meta["drawn_total"].get(d, 0)) for d in self.domains}
        self.drawn_segment = {d: int(meta["drawn_segment"].get(d, 0)) for d in self.domains}
        for i, (s, st) in enumerate(zip(self.streams.values(), meta["streams"])):
            s.epoch, s.pos = int(st["epoch"]), int(st["pos"])
            s.rng.bit_generator.state = st["rng"]
            s.starts = np.asarray(arrays[f"sampler.starts.{i}"], dtype=np.int64)
