"""The valid base of the bad-input tests: a tiny config on two small real-text domains
(conftest's good_data), which each case breaks in one place."""
import sys
from pathlib import Path

import yaml

OPMIX = Path(sys.executable).parent / "opmix-ray"


def base_config(tmp: Path, data: Path) -> dict:
    return {"run": {"name": "bad", "storage_path": str(tmp / "runs")},
            "data": {"path": str(data), "seq_len": 64, "val_tokens_per_domain": 512},
            "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
            "main": {"total_tokens": 20480, "batch_size": 8},
            "adapters": {"r": 4, "steps": 2, "batch_size": 4},
            "search": {"searcher": "random", "num_samples": 2}}


def write_config(tmp: Path, cfg: dict) -> str:
    p = tmp / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)
