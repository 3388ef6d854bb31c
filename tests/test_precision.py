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
