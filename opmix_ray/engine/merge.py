"""Exact weight-space mixtures of LoRA adapters: W(a) = W0 + sum_i a_i * (alpha_i / r_i) * B_i A_i.

This is the weighted sum of each adapter's full weight delta. It is what PEFT's
`add_weighted_adapter(..., combination_type="cat")` computes and NOT what "linear" computes
("linear" mixes A and B separately, so its delta is (sum a_i B_i)(sum a_i A_i), with cross
terms); tests/test_merge.py checks both facts against PEFT itself.

LoRA deltas are kept factored (LowRankStack: A_cat [K, in], B_cat [out, K], K = sum of the ranks,
alpha/r folded into B): a merged model is W0 x + B_cat diag(w_owner) A_cat x, added by a forward
hook on each adapted linear, so neither the k dense deltas nor a merged weight is ever made and
memory is O(K (in + out)) per module (about 3 GB dense against 0.1 GB factored for 7 adapters at
the SmolLM2-135M shape; benchmarks/factored_merge.py). A merge is setting K numbers. Dense
[k, out, in] stacks (stack_deltas) hold what is dense by nature: full components, and the embedding
an adapter trains in full (adapters.embedding: full; load_dense_deltas), merged in place beside the
factored terms; they are also the reference the tests check the factored path against. Either sits in Ray's object store once; trials read it zero-copy.

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


def load_lora_factors(adapter_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One saved PEFT LoRA adapter -> {module name: (A [r, in], (alpha / r) * B [out, r])}, float32."""
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
    return {mod: (ab["A"], (scale * ab["B"]).astype(np.float32)) for mod, ab in sorted(pairs.items())}


def load_dense_deltas(adapter_dir: str | Path, base: torch.nn.Module) -> dict[str, np.ndarray]:
    """What a LoRA adapter changed in `base`'s embedding-like parameters, dense: a parameter trained in
    full (PEFT's modules_to_save, adapters.embedding: full) as trained - base, and an embedding's LoRA
    (adapters.embedding: lora) as (alpha / r) (B A)^T; {parameter name of `base`: [rows, cols] float32},
    {} when there is none. A tied embedding and head are one parameter of `base` and appear once,
    under its first name."""
    d = Path(adapter_dir)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    out = {}
    for name, p in base.named_parameters():  # named_parameters lists a tied weight once
        module = name.rsplit(".", 1)[0]
        t = tensors.get(f"base_model.model.{name}")
        A, B = (tensors.get(f"base_model.model.{module}.lora_embedding_{x}") for x in "AB")
        if t is None and A is not None and B is not None:
            conf = json.loads((d / "adapter_config.json").read_text())
            t = (float(conf["lora_alpha"]) / float(conf["r"])) * (B.astype(np.float32) @ A.astype(np.float32)).T \
                + p.detach().cpu().float().numpy()
        if t is None:
            continue
        if t.shape != tuple(p.shape):
            raise AdapterError(f"adapter {d}: {name} has shape {t.shape}, the base {tuple(p.shape)} "
                               "(fix: adapters must be trained on this round's checkpoint)")
        out[name] = t.astype(np.float32) - p.detach().cpu().float().numpy()
    return out


def moved_by(base: torch.nn.Module, module: str, dense: dict) -> bool:
    """Whether `module`'s weight is a parameter that a dense delta already moves (a head tied to an
    embedding whose delta is dense: its own LoRA factors would count the same change twice)."""
    params = dict(base.named_parameters())
    w = getattr(base.get_submodule(module), "weight", None)
    return any(params.get(name) is w for name in dense)


def load_lora_delta(adapter_dir: str | Path) -> dict[str, np.ndarray]:
    """One saved PEFT LoRA adapter -> {module name: (alpha / r) * B @ A} as float32 [out, in]."""
    return {mod: B @ A for mod, (A, B) in load_lora_factors(adapter_dir).items()}


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


class LowRankStack:
    """k adapters' deltas of one module, never multiplied out: delta_i = B[:, owner == i] @ A[owner == i]."""

    def __init__(self, A: np.ndarray, B: np.ndarray, owner: np.ndarray, k: int):
        self.A, self.B, self.owner, self.k = A, B, owner, k  # [K, in], [out, K] (alpha/r in B), [K], adapters

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.k, self.B.shape[0], self.A.shape[1])

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes + self.owner.nbytes

    def __rmul__(self, c: float) -> "LowRankStack":  # delta scale c (search.delta_scale)
        return LowRankStack(self.A, (c * self.B).astype(np.float32), self.owner, self.k)

    def astype(self, dtype) -> "LowRankStack":
        return self

    def __getitem__(self, i: int) -> np.ndarray:
        """Adapter i's dense delta [out, in] (one module, for checks; the merge never calls it)."""
        rows = self.owner == i
        return self.B[:, rows] @ self.A[rows]

    def combine(self, w) -> np.ndarray:
        """sum_i w_i delta_i as float64 [out, in]."""
        d = np.asarray(w, dtype=np.float64)[self.owner]
        return (self.B.astype(np.float64) * d) @ self.A.astype(np.float64)

    def sqnorm(self, w) -> float:
        """||sum_i w_i delta_i||_F^2 without forming it: sum((Bd^T Bd) * (A A^T)), two K x K products."""
        Bd = self.B.astype(np.float64) * np.asarray(w, dtype=np.float64)[self.owner]
        A = self.A.astype(np.float64)
        return float(((Bd.T @ Bd) * (A @ A.T)).sum())


def stack_factors(factors: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict[str, LowRankStack]:
    """[k adapters] of {module: (A, B)} -> {module: LowRankStack}; all must cover the same modules."""
    modules = list(factors[0])
    out = {}
    for i, f in enumerate(factors):
        if list(f) != modules:
            raise AdapterError(f"adapter #{i} targets other modules than adapter #0 "
                               "(fix: train every adapter with the same adapters.target_modules)")
    for m in modules:
        shapes = {(f[m][1].shape[0], f[m][0].shape[1]) for f in factors}
        if len(shapes) > 1:
            raise AdapterError(f"adapter deltas for {m} have shapes {sorted(shapes)} (fix: train every adapter "
                               "on the same model)")
        owner = np.concatenate([np.full(f[m][0].shape[0], i, dtype=np.int64) for i, f in enumerate(factors)])
        out[m] = LowRankStack(np.ascontiguousarray(np.concatenate([f[m][0] for f in factors], axis=0)),
                              np.ascontiguousarray(np.concatenate([f[m][1] for f in factors], axis=1)), owner,
                              len(factors))
    return out


def _sqnorm(D, w) -> float:
    if isinstance(D, LowRankStack):
        return D.sqnorm(w)
    x = np.tensordot(np.asarray(w, dtype=np.float64), D, axes=1)
    return float((x * x).sum())


def merged_delta(stacked: dict[str, np.ndarray], weights, norm_to: float | None = None) -> dict[str, np.ndarray]:
    """{module: sum_i w_i * delta_i} (float64 accumulation, returned as float32). norm_to: rescale
    the whole merged delta (every module by one factor) to this Frobenius norm."""
    w = np.asarray(weights, dtype=np.float64)
    out = {m: D.combine(w) if isinstance(D, LowRankStack) else np.tensordot(w, D, axes=1) for m, D in stacked.items()}
    if norm_to is not None:
        norm = float(np.sqrt(sum(float((x * x).sum()) for x in out.values())))
        if norm > 0:
            out = {m: x * (norm_to / norm) for m, x in out.items()}
    return {m: x.astype(np.float32) for m, x in out.items()}


def delta_norm(stacked: dict[str, np.ndarray], i: int) -> float:
    """Frobenius norm of adapter i's whole delta (every module)."""
    unit = np.eye(next(iter(stacked.values())).shape[0])[i]
    return float(np.sqrt(sum(_sqnorm(D, unit) for D in stacked.values())))


class MergedModel:
    """A base model whose adapted linears (or, for full components, parameters) compute with
    W0 + sum_i w_i * delta_i: dense stacks (full components, a trained embedding) are merged into the
    weights in place; LowRankStacks add B_cat diag(w) A_cat x in a forward hook and leave the weights
    alone. One model may hold both."""

    def __init__(self, model: torch.nn.Module, stacked: dict, norm_to: float | None = None):
        """norm_to: every merge is rescaled to this delta norm (search.delta_norm: matched)."""
        self.model, self.stacked, self.norm_to = model, stacked, norm_to
        self.low = {m: D for m, D in stacked.items() if isinstance(D, LowRankStack)}
        self.dense = {m: D for m, D in stacked.items() if not isinstance(D, LowRankStack)}
        params = dict(model.named_parameters())
        try:  # a LoRA delta names its module (the linear's weight); a full component's its parameter
            self.targets = {m: params[m] if m in params else model.get_submodule(m).weight for m in stacked}
        except AttributeError as exc:
            raise AdapterError(f"adapter targets a module this model lacks ({exc}) "
                               "(fix: adapters must come from this model)") from None
        for m, w in self.targets.items():
            if tuple(w.shape) != stacked[m].shape[1:]:
                raise AdapterError(f"adapter delta for {m} has shape {stacked[m].shape[1:]} but the model's "
                                   f"weight is {tuple(w.shape)} (fix: adapters must come from this model)")
        self.base = {m: self.targets[m].detach().clone() for m in self.dense}
        self.scales = {m: torch.zeros(D.B.shape[1], dtype=torch.float32) for m, D in self.low.items()}
        self._factors = {m: (torch.from_numpy(np.ascontiguousarray(D.A)), torch.from_numpy(np.ascontiguousarray(D.B)))
                         for m, D in self.low.items()}
        self._cast: dict = {}
        self._hooks = [model.get_submodule(m).register_forward_hook(self._hook(m)) for m in self.low]

    def _hook(self, m: str):
        def add_low_rank(module, inputs, out):
            key = (m, out.device, out.dtype)
            if key not in self._cast:  # the float32 factors stay as loaded; copies per device and dtype
                A, B = self._factors[m]
                self._cast[key] = (A.to(out.device, out.dtype), B.to(out.device, out.dtype))
            A, B = self._cast[key]
            d = self.scales[m].to(out.device, out.dtype)
            return out + ((inputs[0].to(out.dtype) @ A.T) * d) @ B.T
        return add_low_rank

    @torch.no_grad()
    def apply(self, weights) -> None:
        w = np.asarray(weights, dtype=np.float64)
        f = 1.0
        if self.norm_to is not None:  # one factor for the whole merged delta, factored and dense parts alike
            norm = float(np.sqrt(sum(_sqnorm(D, w) for D in self.stacked.values())))
            f = self.norm_to / norm if norm > 0 else 1.0
        for m, D in self.low.items():
            self.scales[m].copy_(torch.from_numpy(f * w[D.owner]))
        for m, delta in (merged_delta(self.dense, f * w) if self.dense else {}).items():
            p = self.targets[m]
            p.copy_(self.base[m] + torch.from_numpy(delta).to(p.device, p.dtype))

    @torch.no_grad()
    def reset(self) -> None:
        for d in self.scales.values():
            d.zero_()
        for m, p in self.targets.items():
            if m in self.base:
                p.copy_(self.base[m])

    def close(self) -> None:
        """Back to the plain base model: weights restored, hooks removed."""
        self.reset()
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
