"""Full component models (adapters.kind: full, DeMix): the full-weight merge is sum_i w_i theta_i
over every parameter, and (slow, ~80 s) a run with them goes through the whole engine."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from opmix_ray.config import ModelSection, load_config
from opmix_ray.engine.merge import MergedModel, load_full_delta, stack_deltas
from opmix_ray.model import build_model

TINY = Path(__file__).resolve().parent.parent / "opmix_ray" / "configs" / "tiny.yaml"


def test_the_full_weight_merge_is_the_weighted_sum_of_the_components(tmp_path):
    cfg = ModelSection(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    base = build_model(cfg, 128, 16, seed=0)
    thetas = []
    for i in range(3):
        comp = build_model(cfg, 128, 16, seed=0)
        with torch.no_grad():
            for p in comp.parameters():
                p.add_(0.01 * (i + 1) * torch.randn_like(p))
        comp.save_pretrained(tmp_path / f"c{i}", safe_serialization=True)
        thetas.append({n: p.detach().clone() for n, p in comp.named_parameters()})
    stacked = stack_deltas([load_full_delta(tmp_path / f"c{i}", base) for i in range(3)])
    names = {n for n, _ in base.named_parameters()}
    assert set(stacked) == names and any("norm" in n for n in names) and any("embed" in n for n in names)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    mm = MergedModel(base, stacked)
    w = np.array([0.2, 0.5, 0.3])
    mm.apply(w)
    for n, p in base.named_parameters():
        want = sum(float(w[i]) * thetas[i][n] for i in range(3))
        torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=0)
    mm.reset()
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


@pytest.mark.slow  # ~80 s: the default suite keeps the full-weight merge above
def test_a_run_with_full_components_searches_their_merges_and_counts_full_training(tmp_path):
    import ray

    from opmix_ray.engine.driver import run
    cfg = load_config(TINY, {"run": {"storage_path": str(tmp_path)}, "rounds": {"num_rounds": 1},
                             "search": {"num_samples": 3, "searcher": "random"}, "adapters": {"kind": "full"}})
    try:
        summary = run(cfg)
    finally:
        ray.shutdown()
    run_dir = Path(summary["run_dir"])
    comps = sorted((run_dir / "adapters_round_0" / "adapters").glob("*/model.safetensors"))
    assert len(comps) >= 6 and not list((run_dir / "adapters_round_0" / "adapters").glob("*/adapter_config.json"))
    rec = json.loads((run_dir / "history.json").read_text())["rounds"][0]
    assert rec["n_trials"] == 3 and np.isfinite(rec["objective"])
    meta = json.loads((comps[0].parent / "opmix_meta.json").read_text())
    n_adapters = len(list((run_dir / "adapters_round_0" / "adapters").iterdir()))
    assert rec["flops"]["adapters"] == pytest.approx(6.0 * meta["n_params"] * meta["tokens"] * n_adapters)
