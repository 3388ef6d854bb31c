"""MixtureSearcher: the base every opmix-ray searcher builds on (a `ray.tune.search.Searcher`).

A subclass writes three small methods and gets the rest right for free:

    class MySearcher(MixtureSearcher):
        def propose(self, trial_id):            # -> weights (array), a config dict, None or FINISHED
            return self.rng(len(self.history)).dirichlet(np.ones(len(self.space.coords)))
        def observe(self, trial_id, weights, value, result):   # value None = failed trial
            ...
        # state() / load_state(s): only if the subclass keeps state of its own (JSON-able dicts)

What the base guarantees (and opmix_ray.searchers.testing checks for every searcher):
- every suggestion is on the space (finite, on the simplex, within bounds and the space's linear
  rows A_ub @ w <= b_ub, via space.contains) or a SearcherError
  saying which searcher broke it; weights are sent as the space's own params;
- warm-start points (points_to_evaluate) are suggested first, in order;
- a NaN / inf / missing objective or an errored trial reaches `observe` as value=None (failed),
  never as a number that would poison a model;
- once FINISHED is returned it stays returned;
- a trial reported complete a second time is ignored (it is in `history` once);
- save/restore write plain JSON (never pickle) and restore gives the same next suggestion:
  `history` (every finished trial, in order) and `live` (suggested, unfinished) are saved for the
  subclass, and `rng(n)` gives a generator that depends only on (seed, n).
"""
from __future__ import annotations

import functools
import json
import math
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import numpy as np
from ray.tune.search import Searcher

from opmix_ray.errors import SearcherError

METRIC = "objective"  # what a trial reports and every searcher minimises
MODE = "min"


def clean_value(result: dict | None, error: bool = False, metric: str = METRIC) -> float | None:
    """The trial's objective as a finite float, or None for a failed trial."""
    if error or not isinstance(result, dict):
        return None
    try:
        v = float(result.get(metric))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def as_floats(d: dict | None, prefix: str) -> dict[str, float]:
    """{key[len(prefix):]: finite value} for the result's keys with that prefix (e.g. loss_)."""
    out = {}
    for k, v in (d or {}).items():
        if k.startswith(prefix):
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                out[k[len(prefix):]] = v
    return out


@dataclass(frozen=True)
class TrialResult:
    """One scored candidate. Between processes (Tune, the scorer pool, the trials parquet) it travels
    as the flat row of scalars searchers read: objective, loss_<domain>, mix_<domain>,
    a_<coordinate>. as_row writes that row and from_row reads it; nothing else builds or slices one."""
    objective: float
    losses: dict[str, float]  # val loss per domain scored
    mixture: dict[str, float]  # the mixture over domains the candidate stands for
    weights: dict[str, float]  # the adapter weight per search coordinate (what was merged)

    def as_row(self) -> dict[str, float]:
        return {METRIC: self.objective, **{f"loss_{d}": v for d, v in self.losses.items()},
                **{f"mix_{d}": w for d, w in self.mixture.items()}, **{f"a_{k}": w for k, w in self.weights.items()}}

    @classmethod
    def from_row(cls, row: dict) -> TrialResult:
        return cls(float(row[METRIC]), as_floats(row, "loss_"), as_floats(row, "mix_"), as_floats(row, "a_"))


class MixtureSearcher(Searcher, metaclass=ABCMeta):
    """Base class for searchers over a mixture space (SimplexSpace / ConstrainedSimplex / ...).
    A subclass must implement `propose`; Python refuses to build one that does not."""

    def __init_subclass__(cls, **kw):
        """Record each instance's constructor options (all but space, seed, points_to_evaluate), so a
        saved state carries them and a restore into a default-built instance rebuilds it as saved."""
        super().__init_subclass__(**kw)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording(self, *args, **kwargs):
            outermost = not getattr(self, "_recording", False)
            if outermost:
                self._recording = True
                self._options = {k: v for k, v in kwargs.items()
                                 if k not in ("space", "seed", "points_to_evaluate") and _jsonable(v)}
            try:
                init(self, *args, **kwargs)
            finally:
                if outermost:
                    self._recording = False
        cls.__init__ = recording

    def __init__(self, *, space, seed: int = 0, points_to_evaluate=None, metric: str = METRIC,
                 mode: str = MODE):
        if mode not in ("min", "max"):
            raise SearcherError(f"search mode '{mode}' (fix: use 'min' or 'max')")
        super().__init__(metric=metric, mode=mode)
        if not hasattr(self, "_options"):
            self._options = {}
        self.space, self.seed = space, int(seed)
        self._warm: list[list[float]] = []
        for p in points_to_evaluate or []:
            if isinstance(p, dict):  # {coord: weight} or a config dict (u_ / w_ keys)
                w = np.array([p[c] for c in space.coords]) if all(c in p for c in space.coords) else space.weights(p)
            else:
                w = np.asarray(p, dtype=np.float64)
            w = w / w.sum() if w.sum() > 0 else w
            if not space.contains(w, tol=1e-6):
                raise SearcherError(f"search warm start {np.round(w, 4).tolist()} is not on the space "
                                    f"(fix: pass mixtures over {space.coords} that satisfy the bounds and caps)")
            self._warm.append(w.tolist())
        self.live: dict[str, list[float]] = {}  # trial_id -> suggested weights
        self.history: list[dict] = []  # {"id", "w", "value" (None = failed), "losses"} in finish order
        self.n_suggested = 0
        self._finished = False

    # --- what a subclass implements ---
    @abstractmethod
    def propose(self, trial_id: str):
        """Next candidate: weights over space.coords, a config dict, None (not now) or FINISHED."""

    def observe(self, trial_id: str, weights: np.ndarray, value: float | None, result: dict | None) -> None:
        """A trial finished; value is None when it failed (NaN, inf, missing metric, error)."""

    def state(self) -> dict:
        """The subclass's own JSON-able state (beyond history/live/rng), for save/restore."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    # --- for subclasses ---
    def rng(self, n: int) -> np.random.Generator:
        """A generator that depends only on (seed, n): draws survive save/restore unchanged."""
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(n)])

    def completed(self) -> tuple[np.ndarray, np.ndarray]:
        """(weights [n, k], values [n]) of the successful trials so far."""
        ok = [h for h in self.history if h["value"] is not None]
        k = len(self.space.coords)
        return (np.array([h["w"] for h in ok], dtype=np.float64).reshape(-1, k),
                np.array([h["value"] for h in ok], dtype=np.float64))

    # --- the Ray Tune Searcher API ---
    def suggest(self, trial_id: str):
        if self._finished:
            return Searcher.FINISHED
        out = None
        if self._warm:
            w = np.asarray(self._warm.pop(0))
        else:
            out = self.propose(trial_id)
            if out is None:
                return None
            if isinstance(out, str) and out == Searcher.FINISHED:
                self._finished = True
                return Searcher.FINISHED
            w = self._to_weights(out)
        self.live[trial_id] = w.tolist()
        self.n_suggested += 1
        names = self.space.param_names
        if isinstance(out, dict) and all(p in out for p in names):
            return {p: float(out[p]) for p in names}  # keep the searcher's own point (e.g. Optuna's u)
        return self.space.params(w)

    def _to_weights(self, out) -> np.ndarray:
        name = type(self).__name__
        try:
            w = self.space.weights(out) if isinstance(out, dict) else np.asarray(out, dtype=np.float64)
        except (KeyError, ValueError, TypeError) as exc:
            raise SearcherError(f"{name} suggested {out!r}, not a point of the space ({exc}) (fix: return "
                                "weights over space.coords or a dict from space.params/space.sample)") from None
        if not self.space.contains(w, tol=1e-6):
            raise SearcherError(f"{name} suggested weights {np.round(w, 6).tolist()} off the space "
                                f"(need finite, >= 0, sum 1, within bounds and caps) (fix: return space.project(w))")
        return self.space.project(w) if not self.space.contains(w) else w

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        """What Tune passes from TuneConfig(metric=, mode=): honoured (a "max" mode is maximised);
        an unknown mode is refused, which Tune reports."""
        if mode is not None and mode not in ("min", "max"):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def _value(self, result: dict | None, error: bool) -> float | None:
        """The trial's value as this searcher minimises it (negated when the mode is max)."""
        v = clean_value(result, error, self.metric or METRIC)
        return -v if v is not None and self.mode == "max" else v

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        w = self.live.pop(trial_id, None)
        if w is None and any(h["id"] == trial_id for h in self.history):
            # completed already: Tune can report one trial complete twice (a late result, an actor
            # death counted twice), and a second count would weigh its value double in every model
            return
        if w is None:  # a trial we never suggested (e.g. restored without it): use what it reports
            a = as_floats(result, "a_")
            if not all(c in a for c in self.space.coords):
                return
            w = [a[c] for c in self.space.coords]
        value = self._value(result, error)
        losses = as_floats(result, "loss_") if value is not None else {}
        self.history.append({"id": trial_id, "w": list(map(float, w)), "value": value, "losses": losses})
        self.observe(trial_id, np.asarray(w), value, result if value is not None else None)

    # --- results from elsewhere (Tune's warm-start API) ---
    def add_evaluated_point(self, parameters: dict, value: float, error: bool = False, pruned: bool = False,
                            intermediate_values=None) -> None:
        """A point evaluated outside this search (an earlier experiment): parameters are a config of
        this space (u_/w_ keys), a_<coord> keys, or {coord: weight}; value is the metric's value."""
        a = as_floats(parameters, "a_")
        if all(c in parameters for c in self.space.coords):
            w = np.array([float(parameters[c]) for c in self.space.coords])
        elif all(c in a for c in self.space.coords):
            w = np.array([a[c] for c in self.space.coords])
        else:
            w = self.space.weights(parameters)
        if not self.space.contains(w, tol=1e-6):
            raise SearcherError(f"evaluated point {np.round(w, 4).tolist()} is not on the space (fix: pass points "
                                f"over {self.space.coords} within the bounds and caps)")
        result = None if error or pruned else {**(parameters if isinstance(parameters, dict) else {}),
                                               (self.metric or METRIC): value}
        v = self._value(result, error or pruned)
        tid = f"evaluated_{len(self.history)}"
        self.history.append({"id": tid, "w": list(map(float, w)), "value": v,
                             "losses": as_floats(parameters, "loss_") if v is not None else {}})
        self.observe(tid, w, v, result if v is not None else None)

    def add_evaluated_trials(self, trials_or_analysis, metric: str) -> None:
        """Finished Tune trials (a ResultGrid, a list of Trials or of result dicts): each one's config
        and reported metrics go in through add_evaluated_point."""
        items = list(trials_or_analysis)
        for t in items:
            metrics = getattr(t, "metrics", None) or getattr(t, "last_result", None) or (t if isinstance(t, dict) else {})
            config = getattr(t, "config", None) or metrics.get("config") or {}
            if metric not in metrics:
                continue
            self.add_evaluated_point({**config, **metrics}, metrics[metric])

    # --- plain JSON save / restore ---
    def get_state(self) -> dict:
        return {"class": type(self).__name__, "seed": self.seed, "options": self._options, "mode": self.mode,
                "metric": self.metric, "warm": self._warm, "live": self.live, "history": self.history,
                "n_suggested": self.n_suggested, "finished": self._finished, "own": self.state()}

    def set_state(self, state: dict) -> None:
        if state.get("class") != type(self).__name__:
            raise SearcherError(f"searcher state is for {state.get('class')}, not {type(self).__name__} "
                                "(fix: restore with the same search.searcher that saved it)")
        options = state.get("options", self._options)
        if options != self._options or state["seed"] != self.seed:
            # built with other options or another seed: rebuild as the saved searcher was built
            type(self).__init__(self, space=self.space, seed=state["seed"], **options)
        self._metric, self._mode = state.get("metric", self._metric), state.get("mode", self._mode)
        self.seed, self._warm = state["seed"], [list(w) for w in state["warm"]]
        self.live, self.history = dict(state["live"]), list(state["history"])
        self.n_suggested, self._finished = state["n_suggested"], state["finished"]
        self.load_state(state["own"])

    def save(self, checkpoint_path: str) -> None:
        from opmix_ray.storage import atomic_write_bytes
        atomic_write_bytes(checkpoint_path, json.dumps(self.get_state()).encode())

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))
