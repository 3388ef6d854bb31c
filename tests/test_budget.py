"""search.budget_fraction: a round's search sized to a share of the training it decides (engine/budget.py)."""
import pytest

from opmix_ray.compute import round_search_flops, train_flops
from opmix_ray.config import load_config
from opmix_ray.engine.budget import DECISION_EVALS, MIN_SAMPLES, MIN_STEPS, MIN_WINDOWS, sized

N, L = 1_400_000, 128
AVAILABLE = [8192] * 5  # selection tokens of five domains
SEGMENT = 40 * 16 * L  # a 40-step continual stage


def _cfg(frac):
    return load_config({"adapters": {"steps": 20, "batch_size": 16},
                        "search": {"num_samples": 12, "eval_tokens_per_domain": 4096, "budget_fraction": frac}})


def _cost(cfg, n_adapters):
    eval_tokens = sum(min(a, cfg.search.eval_tokens_per_domain) for a in AVAILABLE)
    return round_search_flops(N, cfg.adapters.steps * cfg.adapters.batch_size * L, n_adapters,
                              cfg.search.num_samples + DECISION_EVALS, eval_tokens)["total"]


def test_a_round_over_its_budget_scales_steps_candidates_and_windows_to_fit_and_says_so():
    cfg = _cfg(0.5)
    assert _cost(cfg, 3) > train_flops(N, SEGMENT)  # as configured, the search costs more than the stage
    out, used = sized(cfg, N, L, 3, SEGMENT, AVAILABLE)
    assert used and not used["at_minimum"] and 0 < used["factor"] < 1
    assert MIN_STEPS <= out.adapters.steps < 20 and MIN_SAMPLES <= out.search.num_samples < 12
    assert MIN_WINDOWS * L <= out.search.eval_tokens_per_domain < 4096
    assert _cost(out, 3) == pytest.approx(used["flops"]) and used["flops"] <= 0.5 * train_flops(N, SEGMENT)
    assert (cfg.adapters.steps, cfg.search.num_samples) == (20, 12)  # the run's own config is untouched


def test_a_round_within_budget_or_without_one_runs_as_configured():
    for frac, segment in ((0.25, 10**9), (None, 1)):
        cfg = _cfg(frac)
        out, used = sized(cfg, N, L, 3, segment, AVAILABLE)
        assert out is cfg and used is None


def test_a_budget_too_small_for_the_minimum_runs_the_minimum_and_records_it():
    out, used = sized(_cfg(0.01), N, L, 3, SEGMENT, AVAILABLE)
    assert (out.adapters.steps, out.search.num_samples, out.search.eval_tokens_per_domain) == \
        (MIN_STEPS, MIN_SAMPLES, MIN_WINDOWS * L) and used["at_minimum"]
