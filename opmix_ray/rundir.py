"""Every path and file name inside a run dir, here and nowhere else.

    <storage_path>/<name>/
      .opmix_run                         written first: an opmix-ray run dir      RUN_MARKER
      config.yaml                        the resolved config                      CONFIG
      data_manifest.json                 tokens per domain, hashes                DATA_MANIFEST
      history.json, history.parquet      one record per round, then the final     HISTORY, HISTORY_PARQUET
      summary.json                       written last: the run finished           SUMMARY
      main/round_<k>/, main/round_final/ HF checkpoints (+ train_state.*)         checkpoint(k)
      adapters_round_<k>/adapters/<a>/   PEFT adapters + opmix_meta.json          adapter_root(k)
      search_round_<k>/                  the round's Tune experiment              search_job(k)
      search_round_<k>/rerun/            candidates whose trial process died      search_rerun(k)
      rounds/round_<k>_trials.parquet    every candidate scored                   trials(k)
      rounds/round_<k>_manifest.json     sha256 of the round's files, written last manifest(k)
      fidelity_round_<k>.json            `opmix-ray fidelity`                      fidelity(k)
      mixture.png, live.json, added_domains/, error.log (a failed run's traceback)

Paths are relative to the run dir (strings, so that a bucket mirror can use them as keys);
`at(run_dir, rel)` joins one onto a local dir.
"""
from __future__ import annotations

from pathlib import Path

RUN_MARKER = ".opmix_run"  # written first: this dir is an opmix-ray run; --overwrite removes only such dirs
CONFIG = "config.yaml"
DATA_MANIFEST = "data_manifest.json"
HISTORY = "history.json"
HISTORY_PARQUET = "history.parquet"
SUMMARY = "summary.json"
MIXTURE_PNG = "mixture.png"
ERROR_LOG = "error.log"  # the full traceback of a run that failed inside (RunFailed)
LIVE = "live.json"  # while a run trains: where add-domain and friends find its controller
ADDED_DOMAINS = "added_domains"
MAIN = "main"  # the main run's Ray Train experiment
FINAL = "final"  # the checkpoint at the end of the main run: checkpoint(FINAL)
STATE_JSON = "train_state.json"  # written last in a checkpoint dir: the round is resumable
STATE_TENSORS = "train_state.safetensors"
ADAPTERS = "adapters"  # the adapter job's checkpoint dir name
ADAPTER_META = "opmix_meta.json"
MAIN_SNAPSHOT = f"{MAIN}/checkpoint_manager_snapshot.json"  # Ray Train's own bookkeeping
TRACKING = "tracking"  # the tracking backends' files (engine/tracking.py); W&B offline runs under tracking/wandb
TRACKING_MAIN = f"{TRACKING}/main"  # the main run's TensorBoard events (tracking.tensorboard)
MLFLOW_DB = f"{TRACKING}/mlflow.db"  # tracking.mlflow's default store


def is_run_dir(names) -> bool:
    """Whether a dir holding the file names `names` is an opmix-ray run dir: it has the marker, or
    (written before the marker existed) both the config and the data manifest."""
    names = set(names)
    return RUN_MARKER in names or {CONFIG, DATA_MANIFEST} <= names


def checkpoint(k: int | str) -> str:
    """The main run's checkpoint at round boundary k (or FINAL)."""
    return f"{MAIN}/round_{k}"


def adapters_job(k: int) -> str:
    """Round k's adapter job (a Ray Train experiment)."""
    return f"adapters_round_{k}"


def adapter_root(k: int) -> str:
    """Round k's adapter dirs, one per adapter name."""
    return f"{adapters_job(k)}/{ADAPTERS}"


def search_job(k: int) -> str:
    """Round k's Tune experiment."""
    return f"search_round_{k}"


def search_rerun(k: int) -> str:
    """Round k's second Tune experiment: the candidates whose trial ended in a process death, scored again."""
    return f"{search_job(k)}/rerun"


def optuna_journal(k: int) -> str:
    """Round k's Optuna study as a journal file (optuna-dashboard opens it)."""
    return f"{search_job(k)}/optuna_journal.log"


def trials(k: int) -> str:
    return f"rounds/round_{k}_trials.parquet"


def manifest(k: int | str) -> str:
    """sha256 of every file round k (or FINAL) left, written last: `opmix-ray check` verifies it."""
    return f"rounds/round_{k}_manifest.json"


def manifests(run_dir: str | Path) -> list[Path]:
    """Every round's manifest in a run dir (and FINAL's), in name order."""
    return sorted(Path(run_dir).glob(manifest("*")))


def round_artifacts(k: int | str) -> list[str]:
    """The dirs and files a finished round k (or FINAL) leaves, which its manifest covers."""
    if k == FINAL:
        return [checkpoint(FINAL), SUMMARY]
    return [checkpoint(k), adapter_root(k), trials(k)]


def fidelity(k: int) -> str:
    return f"fidelity_round_{k}.json"


def at(run_dir: str | Path, rel: str) -> Path:
    return Path(run_dir) / rel
