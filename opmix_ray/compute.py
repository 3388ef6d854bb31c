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


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's product datasheets; the first name that
# occurs in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12))


def peak_bf16_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None for a device not in PEAK_BF16_FLOPS."""
    return next((f for name, f in PEAK_BF16_FLOPS if name in device_name), None)


def mfu(n_params: int, tokens: int, seconds: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: 6NT training FLOPs per second over the device's peak."""
    if not peak_flops or not seconds:
        return None
    return train_flops(n_params, tokens) / seconds / peak_flops
