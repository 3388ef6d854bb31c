"""FLOPs accounting (the usual 6NT rule, Kaplan et al. 2020): training 6NT, LoRA training ~4NT (no base-weight gradients),
evaluation 2NT, for N parameters and T tokens. Every report splits search from main-run compute."""
from __future__ import annotations


def train_flops(n_params: int, tokens: int) -> float:
    return 6.0 * n_params * tokens


def lora_flops(n_params: int, tokens: int) -> float:
    return 4.0 * n_params * tokens


def eval_flops(n_params: int, tokens: int) -> float:
    return 2.0 * n_params * tokens


def round_search_flops(n_params: int, adapter_tokens: int, n_adapters: int, n_trials: int,
                       eval_tokens_per_trial: int, full: bool = False) -> dict[str, float]:
    """A round's search compute: adapter (or full component, `full`) training plus scoring every candidate."""
    adapters = (train_flops if full else lora_flops)(n_params, adapter_tokens) * n_adapters
    trials = eval_flops(n_params, eval_tokens_per_trial) * n_trials
    return {"adapters": adapters, "trials": trials, "total": adapters + trials}
