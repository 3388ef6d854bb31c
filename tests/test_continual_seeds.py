"""`opmix-ray continual` over several seeds, with uniform-seen's data-order noise per stage.

    pytest tests/test_continual_seeds.py            # seconds: the noise, the pooling, the table
    pytest -m slow tests/test_continual_seeds.py    # + a tiny sequence on 2 seeds with its noise (~1 min)
"""
import math
import os

import numpy as np
import pytest

from opmix_ray.config import ConfigError
from opmix_ray.experiments.continual_report import combine, markdown, stage_noise
from opmix_ray.experiments.experiment_config import load_experiment_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs")


def test_stage_noise_is_sqrt2_times_the_sd_over_orders():
    n = stage_noise(3, [5.0, 5.1, 4.9])
    assert n["stage"] == 3 and n["sd"] == pytest.approx(0.1) and n["noise"] == pytest.approx(0.1 * math.sqrt(2))


def _seq(seed, losses, noise):
    rows = [{"method": m, "stage": s, "seed": seed, "mean_loss": l + 0.1 * (1 - s), "total_flops": 1e12 * (s + 1)}
            for m, l in losses.items() for s in (0, 1)]
    return {"rows": rows, "seen_by_stage": [["a"], ["a", "b"]], "changes": ["+a", "+b"], "flops": {}, "wall_s": 1.0,
            "noise": noise, "noise_by_stage": [stage_noise(1, [5.0, 5.0 + noise])]}


def test_combine_pools_the_seeds_noise_and_the_table_counts_beyond_twice_it():
    res = combine({0: _seq(0, {"uniform-seen": 5.0, "opmix": 4.8}, 0.03),
                   1: _seq(1, {"uniform-seen": 5.0, "opmix": 5.05}, 0.04)})
    assert res["seeds"] == [0, 1] and {r["seed"] for r in res["rows"]} == {0, 1}
    assert res["noise"] == pytest.approx(math.sqrt((0.03 ** 2 + 0.04 ** 2) / 2))
    md = markdown(res)
    row = next(line for line in md.splitlines() if line.startswith("| opmix |"))
    # seed 0: -0.2 beyond 2 x 0.0354 (better); seed 1: +0.05 within it
    assert "-0.2000, +0.0500" in row and "| 1 / 0 of 2 |" in row


def test_instruction_tasks_get_their_answer_loss_noise_and_a_table_against_uniform_seen():
    scores = lambda x: {"t": {"heldout": {"answer_loss": x, "em": 0.5}, "trained": {"answer_loss": x, "em": 0.5}}}
    n = stage_noise(1, [5.0, 5.1], [scores(1.0), scores(1.2)])
    assert n["answer_loss"]["t"]["noise"] == pytest.approx(math.sqrt(2) * np.std([1.0, 1.2], ddof=1))
    assert "answer_loss" not in stage_noise(1, [5.0, 5.1], [{}, {}])  # no task among the seen domains

    def seq(seed, opmix_answer):
        s = _seq(seed, {"uniform-seen": 5.0, "opmix": 5.0}, 0.03)
        for r in s["rows"]:
            r["instruct"] = scores(1.0 if r["method"] == "uniform-seen" else opmix_answer)
        s["noise_by_stage"] = [stage_noise(1, [5.0, 5.03], [scores(1.0), scores(1.1)])]
        return s
    md = markdown(combine({0: seq(0, 0.5), 1: seq(1, 1.05)}))
    row = next(line for line in md.splitlines() if line.startswith("| opmix | t |"))
    # noise sqrt(2) x sd(1.0, 1.1) = 0.1 on both seeds: -0.5 is beyond twice it, +0.05 within
    assert "-0.500, +0.050" in row and "| 1 / 0 of 2 |" in row
    assert "Answer-loss noise, final stage, pooled over seeds: t 0.100" in md


def test_each_stage_draws_its_own_data_order():
    from opmix_ray.data.sampler import MixtureSampler
    from opmix_ray.experiments.continual import stage_data_seed
    from opmix_ray.mixture import Mixture
    seeds = {(seed, stage, order): stage_data_seed(seed, stage, order)
             for seed in range(4) for stage in range(10) for order in range(6)}
    assert all((v is None) == (stage == 0 and order == 0) for (_, stage, order), v in seeds.items())
    assert len({v for v in seeds.values() if v is not None}) == len(seeds) - 4
    # one domain's first windows at stage 1 and 2: another stage reads other windows, not the same again
    tokens = {"a": np.arange(64 * 100, dtype=np.int32)}
    first = [MixtureSampler(tokens, Mixture.from_dict({"a": 1.0}, ["a"]), 64, seed=1000 * stage_data_seed(0, s))
             .next_batch(4)[0] for s in (1, 2)]
    assert not np.array_equal(first[0], first[1])


def test_seeds_are_listed_once():
    with pytest.raises(ConfigError, match=r"schedule.*repeats a seed"):
        load_experiment_config(os.path.join(CONFIGS, "continual_tiny.yaml"), {"schedule": {"seeds": [0, 1, 0]}})


@pytest.mark.slow  # ~1 min: the default suite checks the formulas and the table above
def test_two_seeds_of_uniform_seen_with_its_noise_end_to_end(experiment_results):
    res = experiment_results("continual", "continual_tiny.yaml", "--set", "schedule.seeds=[0, 1]",
                             "--set", "schedule.stages=[{add: [bible, dictionary], tokens: 20480}, "
                             "{add: [python], tokens: 10240}]",
                             "--set", "schedule.methods=[uniform-seen]", "--set", "schedule.noise_orders=2")
    assert res["seeds"] == [0, 1]
    for seed in (0, 1):
        rows = [r for r in res["rows"] if r["seed"] == seed]
        assert {(r["method"], r["stage"]) for r in rows} == {("uniform-seen", 0), ("uniform-seen", 1)}
        (noise,) = res["noise_by_seed"][str(seed)]
        assert noise["stage"] == 1 and len(noise["mean_loss"]) == 3
        # order 0 is the row itself; the other orders differ (another data order from the same checkpoint)
        assert noise["mean_loss"][0] == rows[1]["mean_loss"] and len(set(noise["mean_loss"])) == 3
        assert noise["noise"] == pytest.approx(math.sqrt(2) * np.std(noise["mean_loss"], ddof=1))
    # the seeds differ (init and split); the pooled noise is the root mean square of theirs
    finals = [res["noise_by_seed"][str(s)][-1]["noise"] for s in (0, 1)]
    assert res["noise"] == pytest.approx(math.sqrt(np.mean(np.square(finals))))
    assert len({r["mean_loss"] for r in res["rows"] if r["stage"] == 1}) == 2
