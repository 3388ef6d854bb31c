"""The causal LM: a small Llama built from config, or any local Hugging Face checkpoint dir.

Checkpoints are Hugging Face dirs (config.json + model.safetensors + the tokenizer), so a round
checkpoint is also a valid `model.path` for a later run, and nothing is ever unpickled.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from opmix_ray.config import ModelSection
from opmix_ray.data.tokenizer import write_checkpoint_files


def pick_device(pref: str = "auto", precision: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for fp32) for model.device and model.precision, in a process
    outside the engine's placement (a trainer of your own); the engine's workers take theirs from
    engine/placement.py."""
    device = torch.device("cuda") if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()) else \
        torch.device("cpu")
    return device, autocast_for(device, precision)


def autocast_for(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype model.precision means on `device` (None: fp32)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else None


def on_device(model, model_cfg: ModelSection, device: torch.device | None = None):
    """`model` moved to `device` (None: model.device, as pick_device says), its forward passes in
    lm_loss autocast as model.precision says on that device."""
    if device is None:
        device, dtype = pick_device(model_cfg.device, model_cfg.precision)
    else:
        dtype = autocast_for(device, model_cfg.precision)
    model = model.to(device)
    model._opmix_autocast = dtype  # read through PEFT and DDP wrappers by autocast_dtype
    return model


def autocast_dtype(model) -> torch.dtype | None:
    inner = getattr(model, "module", model)  # DDP keeps plain attributes on the module it wraps
    return getattr(inner, "_opmix_autocast", None)


def set_threads(cpus: float) -> None:
    """One torch thread per Ray CPU the process holds; more only oversubscribes the cores."""
    torch.set_num_threads(max(1, int(cpus)))


def build_model(cfg: ModelSection, vocab_size: int, seq_len: int, seed: int = 0) -> LlamaForCausalLM:
    if cfg.path:
        return load_checkpoint(cfg.path, vocab_size)
    torch.manual_seed(seed)
    conf = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=0, pad_token_id=None,
    )
    conf._attn_implementation = "sdpa"
    return LlamaForCausalLM(conf)


def load_checkpoint(path: str | os.PathLike, vocab_size: int | None = None):
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {p} has no config.json (fix: point it at a Hugging Face "
                                "checkpoint dir, e.g. a round checkpoint of an earlier run)")
    model = AutoModelForCausalLM.from_pretrained(p, use_safetensors=True, dtype=torch.float32)
    if vocab_size is not None and model.config.vocab_size < vocab_size:
        raise ValueError(f"model.path: checkpoint vocab {model.config.vocab_size} < tokenizer vocab "
                         f"{vocab_size} (fix: use the tokenizer the model was trained with)")
    return model


def save_checkpoint(model, path: str | os.PathLike, extra_files: dict[str, bytes] | None = None) -> None:
    """Write an HF checkpoint dir atomically: build it beside the target, then rename. extra_files:
    {name: bytes} written into it too (the tokenizer: data/tokenizer.py)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    write_checkpoint_files(extra_files or {}, tmp)
    if path.exists():
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)


def n_params(model) -> int:
    """Parameters that cost FLOPs per token (tied embedding counted once, as the output matmul)."""
    return sum(p.numel() for p in model.parameters())


def lm_loss(model, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of windows [B, seq_len + 1]; per sequence if reduction='none'."""
    dtype = autocast_dtype(model)
    with torch.autocast(device_type=tokens.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(input_ids=tokens[:, :-1]).logits
    logits = logits.float()
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none")
    ce = ce.view(tokens.size(0), -1)
    return ce.mean() if reduction == "mean" else ce.mean(dim=1)


def distill_loss(model, teacher, tokens: torch.Tensor, old_rows: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """The continual `distill` baseline's loss over windows [B, seq_len + 1]: next-token cross-entropy
    on the new data's rows, and on the old data's rows (old_rows, bool [B]) kl_weight x KL(teacher ||
    model) per token, toward the frozen previous checkpoint's predictions; the mean over rows."""
    per_row = lm_loss(model, tokens, reduction="none")
    if bool(old_rows.any()):
        x = tokens[old_rows, :-1]
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher(input_ids=x).logits.float(), dim=-1)
        s_logp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean(-1)
        per_row = per_row.clone()
        per_row[old_rows] = kl_weight * kl
    return per_row.mean()
