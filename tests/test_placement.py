"""Where each part of a run computes (placement: in the config; opmix_ray/engine/placement.py).

Ray here declares one GPU that this machine does not have (ray.num_gpus: 1): Ray grants GPU shares
as it would on a GPU node, so what each role asks for is read back from Ray itself, while torch,
which sees no CUDA device, computes on the CPU.
"""
import json
import os
import sys

import numpy as np
import pytest
import ray
import torch

from opmix_ray.config import load_config
from opmix_ray.engine import placement as pl
from opmix_ray.engine.preflight import check_resources
from opmix_ray.errors import ConfigError
from opmix_ray.ray_init import init_ray

TINY = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs", "tiny.yaml")
# Ray's workers cannot import this test module: its functions travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ONE_GPU = {"main_gpus": 0.5, "adapter_gpus": 0.25, "trial_gpus": 0.25, "confirm_gpus": 0.5}


def _cfg(tmp=".", placement=None, **over):
    return load_config(TINY, {"run": {"storage_path": str(tmp)}, "ray": {"num_cpus": 3, "num_gpus": 1},
                              "placement": placement or {}, **over})


def _error(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


# --- the config and the preflight, no Ray ---

@pytest.mark.parametrize("placement, where", [
    ({"main_gpus": 1.5}, "placement.main_gpus"), ({"trial_gpus": -0.5}, "placement.trial_gpus"),
    ({"adapter_gpus": 0.33333}, "placement.adapter_gpus"), ({"confirm_gpus": True}, "placement.confirm_gpus"),
    ({"adapter_cpus": 0}, "placement.adapter_cpus"), ({"gpus": 1}, "placement.gpus"),
])
def test_bad_shares_are_one_line_naming_the_field(placement, where):
    assert _error(lambda: _cfg(placement=placement)).startswith(f"config error at {where}:")


@pytest.mark.parametrize("over, words", [
    ({"model": {"device": "cpu"}, "placement": {"trial_gpus": 0.5}}, "placement.trial_gpus=0.5"),
    ({"model": {"device": "cuda"}, "placement": {"main_gpus": 1}}, "placement.adapter_gpus is 0"),
    ({"search": {"scorer_pool": True}, "placement": {"trial_gpus": 0.5}}, "search.scorer_pool"),
    ({"main": {"num_workers": 2}, "placement": {"main_gpus": 0.5}}, "nccl"),
])
def test_a_placement_the_rest_of_the_config_contradicts_is_refused(over, words):
    msg = _error(lambda: load_config(TINY, over))
    assert words in msg and "(fix:" in msg


def test_every_shipped_config_loads_and_the_default_asks_for_no_gpu():
    from opmix_ray.experiments.experiment_config import load_experiment_config
    cfg = load_config(TINY)
    assert not cfg.placement.any_gpus()
    assert pl.trial_resources(cfg) == {"cpu": cfg.search.cpus_per_trial}  # the request CPU runs always made
    assert pl.main_scaling(cfg).resources_per_worker == {"CPU": cfg.main.cpus_per_worker}
    assert not pl.main_scaling(cfg).use_gpu and not pl.adapter_scaling(cfg, 2).use_gpu
    configs = os.path.dirname(TINY)
    for name in sorted(os.listdir(configs)):
        if name.endswith(".yaml"):
            c = load_experiment_config(os.path.join(configs, name))
            assert pl.gpu_problem(c, [{"CPU": 16.0, "GPU": 1.0}]) is None, name  # the GPU configs fit one GPU


@pytest.mark.parametrize("placement, nodes, where", [
    ({"main_gpus": 1}, [{"CPU": 8.0}], "placement.main_gpus"),  # a CPU-only cluster
    ({"main_gpus": 1, "adapter_gpus": 0.5}, [{"CPU": 8.0, "GPU": 1.0}], "placement.adapter_gpus"),  # deadlock
    ({"main_gpus": 0.5, "trial_gpus": 0.75}, [{"CPU": 8.0, "GPU": 1.0}], "placement.trial_gpus"),
    ({"main_gpus": 0.5, "confirm_gpus": 1}, [{"CPU": 8.0, "GPU": 1.0}], "placement.confirm_gpus"),
    ({"main_gpus": 2}, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], "placement.main_gpus"),  # one node
    ({"adapter_cpus": 8}, [{"CPU": 8.0, "GPU": 1.0}], "placement.adapter_cpus"),
])
def test_preflight_refuses_what_the_cluster_cannot_hold(placement, nodes, where):
    msg = _error(lambda: check_resources(_cfg(placement=placement), nodes))
    assert msg.startswith(f"config error at {where}:") and "(fix:" in msg


def test_preflight_passes_shares_that_fit_one_gpu_and_counts_adapter_workers_by_gpu():
    cfg = _cfg(placement=ONE_GPU)
    check_resources(cfg, [{"CPU": 8.0, "GPU": 1.0}])
    check_resources(cfg)  # a local Ray with ray.num_gpus: 1, before it starts
    assert pl.adapter_workers(cfg, 7, {"CPU": 8.0, "GPU": 0.5}) == 2  # 0.5 GPU left / 0.25 each
    assert pl.adapter_workers(cfg, 7, {"CPU": 1.0, "GPU": 0.5}) == 1  # and never more than the CPUs
    msg = _error(lambda: check_resources(_cfg(placement={"main_gpus": 2}), None))  # before Ray starts
    assert msg.startswith("config error at placement.main_gpus:")


def test_the_device_follows_the_grant(monkeypatch):
    cfg = _cfg()
    assert pl.granted_device(0.0) == torch.device("cpu")  # no share: the CPU, whatever is installed
    # granted GPU id 3 of a node whose CUDA_VISIBLE_DEVICES Ray set to "2,3": this process's cuda:1
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pl.granted_device(0.5) == torch.device("cpu")  # granted, but torch sees no CUDA here
    with pytest.raises(RuntimeError, match="model.device: cuda"):
        pl.granted_device(0.5, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    assert pl.granted_device(0.5) == torch.device("cuda", 1)
    assert pl.granted_device(0.0) == torch.device("cpu") and pl.granted_device(0.5, "cpu") == torch.device("cpu")
    assert pl.worker_device(cfg, cfg.placement.main_gpus) == torch.device("cpu")  # the default: no share


# --- what Ray grants each role, read back from Ray (one declared GPU, no CUDA) ---

@pytest.fixture(scope="module")
def gpu_ray(tmp_path_factory):
    ray.shutdown()
    init_ray(_cfg(tmp_path_factory.mktemp("ray"), placement=ONE_GPU))
    assert ray.cluster_resources().get("GPU") == 1.0
    yield
    ray.shutdown()


def _grant(share: float) -> dict:
    """What Ray granted this process, and the device it computes on."""
    got = ray.get_runtime_context().get_assigned_resources()
    return {"cpu": got.get("CPU", 0.0), "gpu": got.get("GPU", 0.0), "device": str(pl.granted_device(share))}


def _train_loop(config: dict) -> None:
    with open(config["out"], "w") as f:  # Train V2 returns metrics only with a checkpoint
        json.dump(_grant(config["share"]), f)


def _trial(config: dict, share: float) -> None:
    from ray import tune
    tune.report(_grant(share))


def _bundles() -> list[dict]:
    """Every placement group bundle Ray made so far (Train's worker groups, Tune's trials), removed ones too."""
    return [dict(b) for pg in ray.util.placement_group_table().values() for b in pg["bundles"].values()]


@pytest.mark.slow  # ~30 s: the default suite keeps the placement checks without Ray
def test_each_role_gets_what_the_placement_asks(gpu_ray, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from ray import tune
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer
    cfg = _cfg(tmp_path, placement={**ONE_GPU, "confirm_cpus": 1})
    p = cfg.placement

    def fit(role, scaling, torch_config, share):
        out = tmp_path / f"{role}.json"
        TorchTrainer(_train_loop, train_loop_config={"share": share, "out": str(out)}, scaling_config=scaling,
                     torch_config=torch_config, run_config=RunConfig(storage_path=str(tmp_path), name=role)).fit()
        return json.loads(out.read_text())

    # the main run's and the adapters' worker groups side by side (they fit together, as in a round)
    with ThreadPoolExecutor(2) as pool:
        main = pool.submit(fit, "main", pl.main_scaling(cfg), pl.main_torch_config(cfg), p.main_gpus)
        adapters = pool.submit(fit, "adapters", pl.adapter_scaling(cfg, 1), pl.adapter_torch_config(), p.adapter_gpus)
        main, adapters = main.result(), adapters.result()
    # the trial and the confirmation task while the round's adapters are gone
    confirm = ray.remote(**pl.confirm_options(cfg, ray.available_resources()))(_grant).remote(p.confirm_gpus)
    grid = tune.Tuner(tune.with_resources(tune.with_parameters(_trial, share=p.trial_gpus), pl.trial_resources(cfg)),
                      tune_config=tune.TuneConfig(num_samples=1),
                      run_config=tune.RunConfig(storage_path=str(tmp_path), name="trials", verbose=0)).fit()
    trial = {k: grid[0].metrics[k] for k in ("cpu", "gpu", "device")}
    # a role the placement gives no GPU is granted none
    plain = ray.remote(num_cpus=1)(_grant).remote(0.0)
    # granted a GPU share each, as the config says; computing on the CPU, as torch sees no CUDA device here
    assert main == {"cpu": cfg.main.cpus_per_worker, "gpu": ONE_GPU["main_gpus"], "device": "cpu"}
    assert adapters == {"cpu": p.adapter_cpus, "gpu": ONE_GPU["adapter_gpus"], "device": "cpu"}
    assert trial == {"cpu": cfg.search.cpus_per_trial, "gpu": ONE_GPU["trial_gpus"], "device": "cpu"}
    assert ray.get(confirm) == {"cpu": 1.0, "gpu": ONE_GPU["confirm_gpus"], "device": "cpu"}
    assert ray.get(plain) == {"cpu": 1.0, "gpu": 0.0, "device": "cpu"}
    bundles = _bundles()  # and the placement groups Train and Tune asked Ray for
    for cpus, gpus in ((cfg.main.cpus_per_worker, p.main_gpus), (p.adapter_cpus, p.adapter_gpus),
                       (cfg.search.cpus_per_trial, p.trial_gpus)):
        assert {"CPU": cpus, "GPU": gpus} in bundles, bundles


def test_confirmation_cpus_default_to_those_free():
    cfg = _cfg(placement=ONE_GPU)
    assert pl.confirm_options(cfg, {"CPU": 3.0, "GPU": 0.5}) == {"num_cpus": 3, "num_gpus": 0.5}
    assert pl.confirm_options(cfg, {"CPU": 20.0}) == {"num_cpus": 8, "num_gpus": 0.5}


def test_a_run_asking_for_gpus_the_cluster_lacks_stops_before_it_writes_anything(gpu_ray, tmp_path):
    from opmix_ray.engine.driver import run
    cfg = _cfg(tmp_path, placement={"main_gpus": 0.5, "adapter_gpus": 1})  # Ray joined already: its one GPU
    msg = _error(lambda: run(cfg))
    assert msg.startswith("config error at placement.adapter_gpus:") and "wait forever" in msg
    assert not (tmp_path / cfg.run.name).exists()


@pytest.mark.slow
def test_a_round_on_one_declared_gpu_completes_without_deadlock(tmp_path):
    """The whole engine (main run, adapters, search, confirmation) sharing one GPU by fractions; a
    deadlock would be a hang, so the run has a deadline. Slow: a full tiny run, 1163 s measured on a
    2-core box that a benchmark kept busy (load average 7)."""
    import signal

    from opmix_ray.engine.driver import run
    ray.shutdown()
    cfg = _cfg(tmp_path, placement=ONE_GPU, rounds={"num_rounds": 1},
               search={"num_samples": 2, "max_concurrent": 2, "warm_start": False, "searcher": "random"})

    def hang(*_):
        raise TimeoutError("the run did not finish in 40 minutes: a placement deadlock?")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(2400)
    try:
        summary = run(cfg)
        bundles = _bundles()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        ray.shutdown()
    assert summary["final_val_loss"] and len(json.loads((tmp_path / "tiny" / "history.json").read_text())["rounds"]) == 1
    for cpus, gpus in ((cfg.main.cpus_per_worker, 0.5), (1.0, 0.25), (cfg.search.cpus_per_trial, 0.25)):
        assert {"CPU": cpus, "GPU": gpus} in bundles, bundles
