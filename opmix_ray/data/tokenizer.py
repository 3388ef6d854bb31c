"""Which tokenizer a run uses, its end-of-text token, and the files that make a checkpoint loadable
with Hugging Face's AutoTokenizer.

    data.tokenizer: a tokenizer.json, or a Hugging Face tokenizer dir (tokenizer.json inside)
    null          : model.path's own tokenizer.json when the model dir has one, else the bundled BPE

Any fast Hugging Face tokenizer ships a tokenizer.json (Llama 3, Mistral, Qwen, GPT-2, SmolLM, ...),
so that file is what a run reads, with the `tokenizers` library. Its end-of-text token is the
`eos_token` of the tokenizer_config.json beside it, else "<|endoftext|>" (the bundled BPE's).
Every checkpoint a run writes carries tokenizer.json and tokenizer_config.json, so

    AutoTokenizer.from_pretrained("<run>/main/round_final")
    AutoModelForCausalLM.from_pretrained("<run>/main/round_final")

both load it (tests/test_hf_models.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from opmix_ray.errors import DataError

BUNDLED = Path(__file__).resolve().parent.parent / "corpus" / "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
# A model's embedding may have more rows than its tokenizer has tokens (padded to a multiple of 64
# or 128; Qwen2 pads 151665 to 151936, Phi-2 50295 to 51200); more than this many extra rows means
# the tokenizer is not the model's.
MAX_VOCAB_PADDING = 1024


def tokenizer_path(data_tokenizer: str | None, model_path: str | None) -> Path:
    """The tokenizer.json a run reads (see the module docstring)."""
    if data_tokenizer:
        p = Path(data_tokenizer).expanduser()
        if p.is_dir():
            if not (p / TOKENIZER_JSON).is_file():
                raise DataError(f"data.tokenizer: {p} is a directory without {TOKENIZER_JSON} (fix: point it at a "
                                "tokenizer.json file or a Hugging Face fast-tokenizer dir)")
            return p / TOKENIZER_JSON
        if not p.is_file():
            raise DataError(f"data.tokenizer: {p} does not exist (fix: point it at a tokenizer.json file)")
        return p
    if model_path and (Path(model_path).expanduser() / TOKENIZER_JSON).is_file():
        return Path(model_path).expanduser() / TOKENIZER_JSON
    return BUNDLED


def eos_token(tok_path: Path) -> str:
    """The end-of-text token: tokenizer_config.json's eos_token beside the file, else <|endoftext|>."""
    conf = Path(tok_path).parent / TOKENIZER_CONFIG
    if Path(tok_path).name == TOKENIZER_JSON and conf.is_file():
        try:
            eos = json.loads(conf.read_text()).get("eos_token")
        except (ValueError, OSError, AttributeError):
            eos = None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and eos:
            return eos
    return EOS_TOKEN


def checkpoint_files(tok_path: Path, eos: str, seq_len: int) -> dict[str, bytes]:
    """{file name: bytes} to write into every checkpoint dir: the tokenizer (byte for byte, so a run
    started from the checkpoint has the same tokenizer hash) and its config."""
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None,
            "model_max_length": seq_len, "clean_up_tokenization_spaces": False}
    own = Path(tok_path).parent / TOKENIZER_CONFIG
    if Path(tok_path).name == TOKENIZER_JSON and own.is_file():
        try:  # the tokenizer's own settings (its class, special tokens, chat template) win
            conf = {**conf, **json.loads(own.read_text())}
        except ValueError:
            pass
    return {TOKENIZER_JSON: Path(tok_path).read_bytes(), TOKENIZER_CONFIG: json.dumps(conf, indent=1).encode()}


def write_checkpoint_files(files: dict[str, bytes], out_dir: str | Path) -> None:
    for name, data in files.items():
        (Path(out_dir) / name).write_bytes(data)


def vocab_problem(model_vocab: int, tokenizer_vocab: int) -> str | None:
    """Why a model with `model_vocab` embedding rows cannot use this tokenizer, or None."""
    if model_vocab < tokenizer_vocab:
        return (f"the checkpoint's vocab ({model_vocab}) is smaller than the tokenizer's ({tokenizer_vocab}) "
                "(fix: use the tokenizer the model was trained with, or a model built for this tokenizer)")
    if model_vocab > tokenizer_vocab + MAX_VOCAB_PADDING:
        return (f"the checkpoint's vocab ({model_vocab}) is far larger than the tokenizer's ({tokenizer_vocab}): "
                "the token ids would mean other tokens to the model (fix: set data.tokenizer to the model's own "
                "tokenizer.json or tokenizer dir, or keep it null when model.path carries one)")
    return None
