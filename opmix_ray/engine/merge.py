"""Exact weight-space mixtures of LoRA adapters: W(a) = W0 + sum_i a_i * (alpha_i / r_i) * B_i A_i.

This is the weighted sum of each adapter's full weight delta. It is what PEFT's
`add_weighted_adapter(..., combination_type="cat")` computes and NOT what "linear" computes
("linear" mixes A and B separately, so its delta is (sum a_i B_i)(sum a_i A_i), with cross
terms); tests/test_merge.py checks both facts against PEFT itself.

Deltas are dense numpy arrays [k, out, in] per module so they sit in Ray's object store once and
every trial reads them zero-copy; one merge is a tensordot per module (milliseconds).

Full component models (adapters.kind: full, DeMix) merge the same way over every parameter:
theta(w) = theta_0 + sum_i w_i (theta_i - theta_0), which for weights summing to 1 is DeMix's
sum_i w_i theta_i; their deltas are keyed by parameter name ("model.norm.weight").
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from opmix_ray.errors import AdapterError

# PEFT saves "base_model.model.<module>.lora_A.weight" (adapter name stripped on save).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def load_lora_delta(adapter_dir: str | Path) -> dict[str, np.ndarray]:
    """One saved PEFT LoRA adapter -> {module name: (alpha / r) * B @ A} as float32 [out, in]."""
    d = Path(adapter_dir)
    try:
        conf = json.loads((d / "adapter_config.json").read_text())
        tensors = load_file(str(d / "adapter_model.safetensors"))
    except Exception as exc:
        raise AdapterError(f"adapter {d}: cannot read adapter_config.json / adapter_model.safetensors "
                           f"({type(exc).__name__}: {exc}) (fix: retrain the adapters for this round)") from None
    if conf.get("use_rslora") or conf.get("use_dora"):
        raise AdapterError(f"adapter {d}: rsLoRA/DoRA deltas are not B@A (fix: train plain LoRA adapters)")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = t.astype(np.float32)
    if not pairs:
        raise AdapterError(f"adapter {d}: no LoRA A/B weights found (fix: save with PEFT save_pretrained)")
    for mod, ab in pairs.items():
        A, B = ab.get("A"), ab.get("B")
        if A is None or B is None or A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            shapes = {k: v.shape for k, v in ab.items()}
            raise AdapterError(f"adapter {d}: {mod} has LoRA weights {shapes}, not a matching "
                               "A [r, in] / B [out, r] pair (fix: retrain the adapters for this round)")
    scale = float(conf["lora_alpha"]) / float(conf["r"])
    return {mod: scale * (ab["B"] @ ab["A"]) for mod, ab in sorted(pairs.items())}


def load_full_delta(component_dir: str | Path, base: torch.nn.Module) -> dict[str, np.ndarray]:
    """One fully fine-tuned component model (a HF model dir) -> {parameter name: theta_i - theta_0}
    over every parameter of `base` (tied parameters once, under their first name)."""
    d = Path(component_dir)
    try:
        tensors = {}
        for f in sorted(d.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
    except Exception as exc:
        raise AdapterError(f"component model {d}: cannot read its safetensors ({type(exc).__name__}: {exc}) "
                           "(fix: retrain the components for this round)") from None
    out = {}
    for name, p in base.named_parameters():
        if name not in tensors:
            raise AdapterError(f"component model {d} lacks parameter {name} (fix: components must be "
                               "fine-tuned from this round's checkpoint)")
        theta = tensors[name].astype(np.float32)
        if theta.shape != tuple(p.shape):
            raise AdapterError(f"component model {d}: {name} has shape {theta.shape}, the base "
                               f"{tuple(p.shape)} (fix: components must come from this model)")
        out[name] = theta - p.detach().cpu().float().numpy()
    return out


def stack_deltas(deltas: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """[k adapters] of {module: [out, in]} -> {module: [k, out, in]}; all must cover the same modules."""
    modules = list(deltas[0])
    for i, d in enumerate(deltas):
        if list(d) != modules:
            raise AdapterError(f"adapter #{i} targets other modules than adapter #0 "
                               "(fix: train every adapter with the same adapters.target_modules)")
        for m in modules:
            if d[m].shape != deltas[0][m].shape:
                raise AdapterError(f"adapter #{i} delta for {m} has shape {d[m].shape}, adapter #0 "
                                   f"{deltas[0][m].shape} (fix: train every adapter on the same model)")
    return {m: np.stack([d[m] for d in deltas]) for m in modules}


def merged_delta(stacked: dict[str, np.ndarray], weights, norm_to: float | None = None) -> dict[str, np.ndarray]:
    """{module: sum_i w_i * delta_i} (float64 accumulation, returned as float32). norm_to: rescale
    the whole merged delta (every module by one factor) to this Frobenius norm."""
    w = np.asarray(weights, dtype=np.float64)
    out = {m: np.tensordot(w, D, axes=1) for m, D in stacked.items()}
    if norm_to is not None:
        norm = float(np.sqrt(sum(float((x * x).sum()) for x in out.values())))
        if norm > 0:
            out = {m: x * (norm_to / norm) for m, x in out.items()}
    return {m: x.astype(np.float32) for m, x in out.items()}


def delta_norm(stacked: dict[str, np.ndarray], i: int) -> float:
    """Frobenius norm of adapter i's whole delta (every module)."""
    return float(np.sqrt(sum(float((D[i].astype(np.float64) ** 2).sum()) for D in stacked.values())))


class MergedModel:
    """A base model whose adapted linears (or, for full components, parameters) can be set to
    W0 + sum_i w_i * delta_i in place."""

    def __init__(self, model: torch.nn.Module, stacked: dict[str, np.ndarray], norm_to: float | None = None):
        """norm_to: every merge is rescaled to this delta norm (search.delta_norm: matched)."""
        self.model, self.stacked, self.norm_to = model, stacked, norm_to
        params = dict(model.named_parameters())
        try:  # a LoRA delta names its module (the linear's weight); a full component's its parameter
            self.targets = {m: params[m] if m in params else model.get_submodule(m).weight for m in stacked}
        except AttributeError as exc:
            raise AdapterError(f"adapter targets a module this model lacks ({exc}) "
                               "(fix: adapters must come from this model)") from None
        self.base = {m: w.detach().clone() for m, w in self.targets.items()}
        for m, w in self.targets.items():
            if tuple(w.shape) != stacked[m].shape[1:]:
                raise AdapterError(f"adapter delta for {m} has shape {stacked[m].shape[1:]} but the model's "
                                   f"weight is {tuple(w.shape)} (fix: adapters must come from this model)")

    @torch.no_grad()
    def apply(self, weights) -> None:
        for m, delta in merged_delta(self.stacked, weights, self.norm_to).items():
            w = self.targets[m]
            w.copy_(self.base[m] + torch.from_numpy(delta).to(w.device, w.dtype))

    @torch.no_grad()
    def reset(self) -> None:
        for m, w in self.targets.items():
            w.copy_(self.base[m])
