"""Confirming a move with real training before it is pushed (decision.confirm).

The merged-adapter search ranks mixtures by a weight-space blend, and a blend is not like for like
with stay: several near-orthogonal deltas at fractional weights move the weights less than one
adapter at full weight, and a concentrated blend moves them more than a spread one. On the
benchmark every move the safe rule pushed was one the 'old' adapter alone (a_old = 1) scored at
least as well as, and the moves that lost were the concentrated ones (RESULTS.md).

The confirmation therefore asks the question the merge approximates, directly: one more LoRA
adapter, trained on the leader's mixture from the same checkpoint with the 'old' adapter's
settings, init and data seed, against the adapter of what the round keeps if it does not move.
That is the 'old' adapter itself (trained on the current mixture) when staying keeps the current
mixture; when staying pushes another one (the current mixture held to the caps left, or new data
at its prior share), a second adapter is trained on that stay the same way, since beating the
current mixture is not beating the stay: new data at 0 loses to almost any mixture that draws it.
Two single adapters, same steps, same lr, same eval windows. The move is pushed only if

    objective(stay) - objective(confirm) > k * SE,   SE^2 = SE_eval^2 + 2 * s1^2

with SE_eval the paired per-window standard error and s1^2 the noise variance of one adapter,
measured by the 'old' replicate (decision.adapter_noise_var); two independent adapters differ by
2 * s1^2. Sharing the data seed makes the two adapters' noise correlated, so 2 * s1^2 is an upper
bound: the test errs toward staying.
"""
from __future__ import annotations

import time

import numpy as np

from opmix_ray.config import Config
from opmix_ray.engine.adapters import REPLICATE, adapter_seeds, train_one
from opmix_ray.engine.rule import adapter_noise_var, paired_se, weighted
from opmix_ray.engine.placement import confirm_options, worker_device
from opmix_ray.evaluate import window_losses
from opmix_ray.model import load_checkpoint, on_device, set_threads


def confirm_windows(cfg: Config, shards, base_path: str, mixture: dict[str, float], lr: float, round_idx: int,
                    adapter_dirs: dict[str, str], cpus: int, stay: dict[str, float] | None = None) -> dict:
    """Train the confirmation adapter on `mixture` (and on `stay`, the mixture staying pushes when it
    is not the current one, as "stay"); per-window eval losses of them, of 'old' and of the replicate
    (if any), all on the search's eval windows. Runs as a Ray task (confirm_move)."""
    from peft import PeftModel

    set_threads(cpus)
    device = worker_device(cfg, cfg.placement.confirm_gpus)
    t0 = time.time()
    tokens = cfg.search.eval_tokens_per_domain
    val = shards.selection()
    res: dict = {"tokens": 0}
    for name, mix in (("confirm", mixture), ("stay", stay)):
        if mix is None:
            continue
        out = train_one(cfg, shards, base_path, name, mix, adapter_seeds(cfg, round_idx, "old"), lr, device)
        res[name] = window_losses(out["model"], val, max_tokens=tokens, device=device)
        res["tokens"] += out["tokens"]
        if name == "confirm":
            res["drawn"] = out["drawn"]
    res["train_s"] = time.time() - t0
    for name in ("old", REPLICATE):
        if name in adapter_dirs:
            model = on_device(load_checkpoint(adapter_dirs[name]), cfg.model, device) if cfg.adapters.kind == "full" \
                else PeftModel.from_pretrained(on_device(load_checkpoint(base_path), cfg.model, device), adapter_dirs[name])
            res[name] = window_losses(model, val, max_tokens=tokens, device=device)
    return res


def confirm_rule(windows: dict, weights: dict[str, float], k: float) -> tuple[bool, str, dict]:
    """(move?, reason, figures) from confirm_windows' output: the confirmation adapter against the
    stay's adapter ("stay" when one was trained, else 'old')."""
    old, conf = windows["old"], windows["confirm"]
    ref, ref_name = (windows["stay"], "the stay's adapter") if "stay" in windows else (old, "'old'")
    gain = weighted(ref, weights) - weighted(conf, weights)
    se_eval = paired_se(conf, ref, weights)
    noise = None
    if REPLICATE in windows:
        noise = adapter_noise_var({d: float(v.mean()) for d, v in old.items()},
                                  {d: float(v.mean()) for d, v in windows[REPLICATE].items()}, weights)
    se_adapter = float(np.sqrt(2.0 * noise)) if noise is not None else 0.0
    se = float(np.sqrt(se_eval**2 + se_adapter**2))
    figures = {"old_objective": weighted(old, weights), "confirm_objective": weighted(conf, weights),
               "stay_objective": weighted(windows["stay"], weights) if "stay" in windows else None,
               "gain": gain, "se": se, "se_eval": se_eval, "se_adapter": se_adapter if noise is not None else None}
    what = "eval + adapter noise" if noise is not None else "eval noise only (no replicate adapter)"
    if gain > k * se:
        return True, f"confirmed: an adapter trained on the leader's mixture beats {ref_name} by {gain:.4f} > " \
                     f"{k:g} x SE {se:.4f} ({what})", figures
    keep = "the stay" if "stay" in windows else "the current mixture"
    return False, f"not confirmed: an adapter trained on the leader's mixture gains {gain:.4f} over {ref_name}, " \
                  f"within {k:g} x SE {se:.4f} ({what}): keeping {keep}", figures


def confirm_move(cfg: Config, shards_ref, base_path: str, mixture: dict[str, float], lr: float, round_idx: int,
                 adapter_dirs: dict[str, str], weights: dict[str, float],
                 stay: dict[str, float] | None = None) -> tuple[bool, str, dict]:
    """Train and score the confirmation adapter (and the stay's, when `stay` is given) as one Ray task
    holding what placement.confirm_* says (by default the CPUs free now: the main run idles during a
    round); (move?, reason, figures incl. wall_s and the adapters' tokens)."""
    import ray

    t0 = time.time()
    options = confirm_options(cfg, ray.available_resources())
    task = ray.remote(**options)(confirm_windows)
    windows = ray.get(task.remote(cfg, shards_ref, base_path, mixture, lr, round_idx, adapter_dirs,
                                  options["num_cpus"], stay))
    moved, reason, figures = confirm_rule(windows, weights, cfg.decision.k)
    return moved, reason, {**figures, "wall_s": time.time() - t0, "train_s": windows["train_s"],
                           "tokens": windows["tokens"], "drawn": windows["drawn"], "adapters": 1 + (stay is not None)}
