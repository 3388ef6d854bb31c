"""model.precision: bf16 autocast for the main run, the adapters and their evaluation. The GPU is
where it pays; on CPU the same autocast path runs (bfloat16 matmuls), so it is tested here."""
from pathlib import Path

import pytest
import torch

from opmix_ray.config import ModelSection, load_config
from opmix_ray.model import build_model, lm_loss, on_device, pick_device, save_checkpoint

TINY = Path(__file__).resolve().parent.parent / "opmix_ray" / "configs" / "tiny.yaml"
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.mark.parametrize("device, precision, want", [("cpu", "auto", None), ("cpu", "fp32", None),
                                                     ("cpu", "bf16", torch.bfloat16)])
def test_precision_maps_to_an_autocast_dtype(device, precision, want):
    assert pick_device(device, precision) == (torch.device("cpu"), want)


def _bf16_outputs(model):
    seen = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


def test_bf16_autocasts_the_matmuls_and_keeps_weights_and_loss_fp32():
    x = torch.randint(0, 300, (4, 33))
    fp32 = lm_loss(on_device(build_model(ModelSection(**SMALL), 300, 32), ModelSection(**SMALL)), x)
    model = on_device(build_model(ModelSection(**SMALL), 300, 32), ModelSection(**SMALL, precision="bf16"))
    seen = _bf16_outputs(model)
    loss = lm_loss(model, x)
    loss.backward()
    assert seen and set(seen) == {torch.bfloat16}
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert loss.item() != fp32.item() and loss.item() == pytest.approx(fp32.item(), abs=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_adapter_trains_under_bf16(tmp_path):
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.adapters import train_one
    cfg = load_config(TINY, {"model": {"precision": "bf16"}})
    shards = build_shards(cfg)
    base = tmp_path / "base"
    save_checkpoint(build_model(cfg.model, shards.vocab_size, shards.seq_len), base)
    seen = []
    orig = torch.nn.Linear.forward
    torch.nn.Linear.forward = lambda self, x: seen.append(torch.get_autocast_dtype("cpu")
                                                         if torch.is_autocast_enabled("cpu") else None) or orig(self, x)
    try:
        out = train_one(cfg, shards, str(base), "python", {d: float(d == "python") for d in shards.domains}, (0, 0),
                        1e-3)
    finally:
        torch.nn.Linear.forward = orig
    assert seen and set(seen) == {torch.bfloat16}
    assert out["final_loss"] == out["final_loss"] and out["tokens"] > 0  # finite, trained


@pytest.mark.parametrize("precision, want", [("bf16", torch.bfloat16), ("auto", None)])
def test_candidates_are_scored_under_the_main_runs_autocast(precision, want):
    """A trial's merged model autocasts as model.precision says on its device (on a CPU, auto is fp32)."""
    import numpy as np

    from opmix_ray.engine.candidates import Candidates
    from opmix_ray.engine.scoring import merged_model, score
    from opmix_ray.mixture import Mixture
    from opmix_ray.model import autocast_dtype
    model = build_model(ModelSection(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), 64, 16, seed=0)
    stacked = {n: np.zeros((2, *m.weight.shape), dtype=np.float32) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith("proj")}
    val = {"a": np.random.default_rng(0).integers(0, 64, size=(4, 17))}
    c = Candidates(f"precision/{precision}", ("old", "a"), model.config.to_dict(),
                   {k: v.detach().numpy() for k, v in model.state_dict().items()}, stacked, val,
                   Mixture.from_dict({"a": 1.0}), None, None, precision=precision)
    assert autocast_dtype(merged_model(c).model) is want
    row = score(c, np.array([1.0, 0.0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=want is not None):
        ref = float(torch.nn.functional.cross_entropy(
            model(input_ids=torch.as_tensor(val["a"][:, :-1])).logits.float().reshape(-1, 64),
            torch.as_tensor(val["a"][:, 1:]).reshape(-1)))
    assert row["objective"] == pytest.approx(ref, rel=1e-5)
