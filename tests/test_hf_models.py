"""Hugging Face models and tokenizers: a run on a local model dir that carries its own fast
tokenizer (another end-of-text token than the bundled one) uses that tokenizer; a model whose
vocab does not fit the tokenizer is refused in one line; every checkpoint loads back with
AutoTokenizer and AutoModelForCausalLM; adapter configs name their base relative to the run dir,
so a moved run dir still loads with AutoPeftModelForCausalLM (the whole run: slow, ~80 s). Built
locally, no hub.
"""
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opmix_ray.config import ConfigError, load_config
from opmix_ray.data.read import build_shards
from opmix_ray.data.shards import BUNDLED_DIR

TINY = Path(__file__).resolve().parent.parent / "opmix_ray" / "configs" / "tiny.yaml"


def _hf_model_dir(path: Path, vocab_pad: int = 0) -> Path:
    """A 2-layer Llama and a byte-level BPE whose end-of-text token is "</s>", saved as HF does."""
    texts = pq.read_table(BUNDLED_DIR / "fortunes.parquet").column("text").to_pylist()[:60]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=tok.get_vocab_size() + vocab_pad, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    LlamaForCausalLM(conf).save_pretrained(path, safe_serialization=True)
    return path


def test_the_models_own_tokenizer_is_used_with_its_eos(tmp_path):
    model = _hf_model_dir(tmp_path / "m")
    cfg = load_config(TINY, {"model": {"path": str(model)}})
    sh = build_shards(cfg)
    own = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert sh.vocab_size == own.get_vocab_size() and sh.eos_id == own.token_to_id("</s>")
    assert sh.tokenizer_files["tokenizer.json"] == (model / "tokenizer.json").read_bytes()
    bundled = build_shards(load_config(TINY))
    assert bundled.vocab_size == 4096 and bundled.tokenizer_hash != sh.tokenizer_hash


@pytest.mark.parametrize("pad, tokenizer, why", [
    (0, str(BUNDLED_DIR / "tokenizer.json"), "smaller than the tokenizer's"),  # 514 rows, 4096 ids
    (5000, None, "far larger than the tokenizer's"),  # ids would mean other tokens
])
def test_a_model_tokenizer_vocab_mismatch_is_one_line(tmp_path, pad, tokenizer, why):
    from opmix_ray.engine.preflight import preflight
    model = _hf_model_dir(tmp_path / "m", vocab_pad=pad)
    cfg = load_config(TINY, {"model": {"path": str(model)}, "data": {"tokenizer": tokenizer},
                             "run": {"storage_path": str(tmp_path / "runs")}})
    with pytest.raises(ConfigError, match=f"^config error at model.path: .*{why}.*fix:") as err:
        preflight(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "runs").exists()


@pytest.mark.slow  # ~80 s, a whole run: the default suite keeps the HF tokenizer checks and test_import_model.py
def test_a_run_on_a_hf_model_writes_checkpoints_and_adapters_hf_loads_back(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from opmix_ray.engine.driver import run
    model = _hf_model_dir(tmp_path / "m")
    cfg = load_config(TINY, {"model": {"path": str(model)}, "run": {"storage_path": str(tmp_path / "runs")},
                             "rounds": {"num_rounds": 1}, "search": {"num_samples": 3, "searcher": "random"}})
    try:
        summary = run(cfg)
    finally:
        ray.shutdown()
    run_dir = Path(summary["run_dir"])
    for ckpt in (run_dir / "main" / "round_0", run_dir / "main" / "round_final"):
        tok = AutoTokenizer.from_pretrained(ckpt)
        assert tok.eos_token == "</s>" and tok.encode("hello") == AutoTokenizer.from_pretrained(model).encode("hello")
        assert AutoModelForCausalLM.from_pretrained(ckpt).config.vocab_size == tok.vocab_size
    adapter = next((run_dir / "adapters_round_0").glob("**/adapter_config.json")).parent
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "main/round_0"
    moved = tmp_path / "moved"
    shutil.move(str(run_dir), moved)
    monkeypatch.chdir(moved)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(os.path.relpath(moved / adapter.relative_to(run_dir)))
    assert peft_model.peft_config["default"].r == cfg.adapters.r
