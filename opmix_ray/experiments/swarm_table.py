"""A swarm read from your own files: which columns hold the mixture, the objective and the run id.

    swarm = read_swarm("swarm.csv")                                  # w_<domain>, loss_<domain>
    swarm = read_swarm("mixtures.csv", "metric/the_pile_pile_cc_val_loss", losses="losses.csv",
                       id_column="index", mixture_prefix="train_the_pile_")      # RegMix's two files

Parsing is strict: every cell of a mixture column and of a column the objective reads must be a
finite number, and the first one that is not is named (file, row, column, value) in a DataError.
A swarm whose mixture rows do not sum to 1 is refused unless renormalise=True: a table of
percentages, or one that left a domain out, would otherwise be fitted as something it is not.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opmix_ray.errors import DataError

W, LOSS = "w_", "loss_"
SUM_TOLERANCE = 1e-3  # |row sum - 1| a mixture may be off by before it counts as unnormalised
ID_NAMES = ("index", "id", "run_id", "run")  # an id column found without --id
MIN_RUNS = 5


@dataclass
class SwarmTable:
    """One row per run: its mixture over `domains`, and the columns the objective reads."""
    domains: tuple[str, ...]
    A: np.ndarray                     # [n, k] mixtures, rows summing to 1
    columns: dict[str, np.ndarray]    # the objective's columns: the target, or every loss column
    target: str | None                # the objective's column; None = mean of the loss columns
    ids: list[str] | None = None      # the id column's value per row
    mixture_columns: tuple[str, ...] = ()  # the table's own names for `domains`
    loss_prefix: str = LOSS
    renormalised: int = 0             # rows that summed off 1 and were rescaled (renormalise=True)
    source: str = ""

    def y(self) -> np.ndarray:
        """The objective per run: the target column, or the mean of the loss columns."""
        if self.target is not None:
            return self.columns[self.target]
        return np.mean([self.columns[c] for c in self.loss_columns()], axis=0)

    def loss_columns(self) -> list[str]:
        return [c for c in self.columns if c.startswith(self.loss_prefix)]

    def objective_name(self) -> str:
        return self.target or f"mean of {', '.join(self.loss_columns())}"

    def row_name(self, i: int) -> str:
        return f"row {i + 1}" + (f" (id {self.ids[i]})" if self.ids else "")


@dataclass
class _Cells:
    """A table as read: column names in order, and each column's raw values (CSV: text)."""
    field: str  # the option that named the file, for messages
    path: Path
    names: list[str]
    values: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.values.values()), []))


def _fix(layout: str) -> str:
    return (f"(fix: {layout}; one row per run, as CSV or parquet; see `opmix-ray fit-swarm --help` for the "
            "column options)")


def _read(path: str | Path, field_name: str) -> _Cells:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data error at {field_name}: {p} does not exist {_fix('pass a table file')}")
    if p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(p)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"data error at {field_name}: {p} is not a readable parquet table "
                            f"({' '.join(str(exc).split())[:120]}) {_fix('pass a parquet or CSV table')}") from None
        return _Cells(field_name, p, list(table.column_names),
                      {n: table.column(n).to_pylist() for n in table.column_names})
    # CSV through the csv module, every cell kept as written: a value the check refuses is shown
    # as the user wrote it (pyarrow would have made 'nan' and '' a null, and 'abc' a text column)
    try:
        text = p.read_bytes().decode("utf-8-sig")
        rows = list(csv.reader(text.splitlines()))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"data error at {field_name}: {p} is not a readable CSV table ({type(exc).__name__}) "
                        f"{_fix('save it as UTF-8 CSV or parquet')}") from None
    rows = [r for r in rows if r]  # blank lines
    if not rows:
        raise DataError(f"data error at {field_name}: {p} is empty {_fix('give a header line and a row per run')}")
    names = [n.strip() for n in rows[0]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"data error at {field_name}: {p} names the columns {dupes} twice {_fix('one column per name')}")
    for i, r in enumerate(rows[1:]):
        if len(r) != len(names):
            raise DataError(f"data error at {field_name}: {p} row {i + 1} has {len(r)} cells, the header "
                            f"{len(names)} {_fix('one cell per column in every row')}")
    return _Cells(field_name, p, names, {n: [r[j] for r in rows[1:]] for j, n in enumerate(names)})


def number(value) -> float | None:
    """A cell as a finite float, or None when it is not one (text, empty, NaN, inf, a bool)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        try:
            v = float(str(value).strip())
        except ValueError:
            return None
    return v if math.isfinite(v) else None


def _numbers(cells: _Cells, column: str, rows: list[int], ids: list[str] | None, what: str) -> np.ndarray:
    """The column's cells at `rows` as floats; the first one that is not a finite number is refused."""
    raw = cells.values[column]
    out = np.empty(len(rows))
    for j, i in enumerate(rows):
        v = number(raw[i])
        if v is None:
            where = f"row {i + 1}" + (f" (id {ids[j]})" if ids else "")
            raise DataError(f"data error at {cells.field}: {cells.path} {where}, column {column}: {raw[i]!r} is not a "
                            f"finite number (fix: every {what} cell must be a number; correct or drop that run)")
        out[j] = v
    return out


def _key(value) -> str:
    """An id cell as a join key: 7, 7.0 and '7' are one run."""
    v = number(value)
    return str(int(v)) if v is not None and v == int(v) else str(value).strip()


def _id_column(tables: list[_Cells], id_column: str | None) -> str | None:
    if id_column is not None:
        for t in tables:
            if id_column not in t.names:
                raise DataError(f"data error at --id: {t.path} has no column {id_column!r} (fix: one of {t.names})")
        return id_column
    common = [n for n in ID_NAMES if all(n in t.names for t in tables)]
    if len(tables) > 1 and not common:
        raise DataError(f"data error at --id: {tables[0].path} and {tables[1].path} share none of the id columns "
                        f"{list(ID_NAMES)} (fix: --id COLUMN naming the run id both tables hold)")
    return common[0] if common else None


def _join(mix: _Cells, losses: _Cells, id_column: str) -> tuple[list[str], list[int], list[int]]:
    """(ids, mixture-table rows, losses-table rows) of the runs, in the mixture table's order."""
    keys = {}
    for t in (mix, losses):
        ks = [_key(v) for v in t.values[id_column]]
        seen = set()
        for k in ks:
            if k in seen:
                raise DataError(f"data error at {t.field}: {t.path} holds run {id_column}={k} twice (fix: one row "
                                "per run)")
            seen.add(k)
        keys[t.field] = ks
    where = {k: i for i, k in enumerate(keys[losses.field])}
    missing = [k for k in keys[mix.field] if k not in where]
    extra = sorted(set(where) - set(keys[mix.field]))
    for ks, other, whose in ((missing, losses, "no losses"), (extra, mix, "no mixture")):
        if ks:
            raise DataError(f"data error at {other.field}: {len(ks)} runs have {whose} in {other.path}, e.g. "
                            f"{id_column}={ks[:5]} (fix: give both tables the same runs, or check --id)")
    ids = keys[mix.field]
    return ids, list(range(len(ids))), [where[k] for k in ids]


def _mixture_columns(cells: _Cells, prefix: str, listed: list[str] | None, id_column: str | None) -> list[str]:
    if listed:
        absent = [c for c in listed if c not in cells.names]
        if absent:
            raise DataError(f"data error at --mixture-columns: {absent} are not columns of {cells.path} "
                            f"(fix: name columns it has: {cells.names})")
        cols = list(dict.fromkeys(listed))
    else:
        cols = [c for c in cells.names if c.startswith(prefix) and c != id_column]
    if len(cols) < 2:
        raise DataError(f"data error at {cells.field}: {cells.path} has {len(cols)} mixture columns "
                        f"{'named' if listed else 'starting with'} {listed or repr(prefix)} (fix: --mixture-prefix "
                        "PREFIX or --mixture-columns A,B,... naming the mixture's weight columns; the table's "
                        f"columns are {cells.names[:12]})")
    return cols


def _domain(column: str, prefix: str) -> str:
    return column[len(prefix):] if prefix and column.startswith(prefix) and len(column) > len(prefix) else column


def read_swarm(path: str | Path, target: str | None = None, *, losses: str | Path | None = None,
               id_column: str | None = None, mixture_prefix: str = W, mixture_columns: list[str] | None = None,
               loss_prefix: str = LOSS, renormalise: bool = False, tolerance: float = SUM_TOLERANCE,
               field_names: tuple[str, str] = ("TABLE", "--losses")) -> SwarmTable:
    """Read a swarm: one row per run, a mixture over domains and the losses the run reached.

    path: CSV or parquet with the mixture columns (and the losses, unless `losses` names a second
    table joined to it on `id_column`). Mixture columns: those named `mixture_columns`, else every
    column starting with `mixture_prefix`; a domain is its column's name without the prefix. The
    objective: the column `target`, else the mean of the columns starting with `loss_prefix`.
    id_column: the run id (default: a column named index, id, run_id or run, if there is one),
    used to join the tables and to name rows in errors. Every mixture and objective cell must be a
    finite number, weights >= 0 with a positive sum per row; rows off 1 by more than `tolerance`
    are refused unless `renormalise`. Raises DataError, one line naming the file, row and column.
    """
    main = _read(path, field_names[0])
    tables = [main] + ([_read(losses, field_names[1])] if losses is not None else [])
    idc = _id_column(tables, id_column)
    if losses is not None:
        ids, mix_rows, loss_rows = _join(main, tables[1], idc)
    else:
        ids = [_key(v) for v in main.values[idc]] if idc else None
        mix_rows = loss_rows = list(range(len(main)))
    mcols = _mixture_columns(main, mixture_prefix, mixture_columns, idc)
    doms = tuple(_domain(c, mixture_prefix) for c in mcols)
    if len(set(doms)) != len(doms):
        raise DataError(f"data error at --mixture-columns: {mcols} give the domains {list(doms)}, some twice (fix: "
                        "name each domain's column once)")
    A = np.stack([_numbers(main, c, mix_rows, ids, "mixture") for c in mcols], axis=1)
    if len(A) < MIN_RUNS:
        raise DataError(f"data error at {main.field}: {main.path} has {len(A)} runs; a fit needs at least "
                        f"{MIN_RUNS} (fix: add runs to the swarm)")
    A, renormalised = _check_rows(main, A, mcols, ids, renormalise, tolerance)
    source = main if losses is None else tables[1]
    objective_rows = loss_rows
    others = [n for n in source.names if n != idc and (n not in mcols or source is not main)]
    if target is not None:
        if target not in others:
            numeric = [n for n in others if all(number(v) is not None for v in source.values[n])]
            raise DataError(f"data error at --target: {target!r} is not a column of {source.path} besides the id and "
                            f"the mixture (fix: one of {numeric[:40]})")
        names = [target]
    else:
        names = [n for n in others if n.startswith(loss_prefix)]
        if not names:
            raise DataError(f"data error at --target: {source.path} has no column starting with {loss_prefix!r} "
                            "and no --target was given (fix: --target COLUMN, or --loss-prefix PREFIX naming the loss "
                            "columns whose mean is the objective)")
    cols = {n: _numbers(source, n, objective_rows, ids, "objective") for n in names}
    return SwarmTable(doms, A, cols, target, ids, tuple(mcols), loss_prefix, renormalised,
                      str(main.path) + (f" + {tables[1].path}" if losses is not None else ""))


def _check_rows(cells: _Cells, A: np.ndarray, mcols: list[str], ids, renormalise: bool,
                tolerance: float) -> tuple[np.ndarray, int]:
    neg = np.argwhere(A < 0)
    if len(neg):
        i, j = neg[0]
        where = f"row {i + 1}" + (f" (id {ids[i]})" if ids else "")
        raise DataError(f"data error at {cells.field}: {cells.path} {where}, column {mcols[j]}: weight {A[i, j]:g} "
                        "is negative (fix: mixture weights are >= 0)")
    sums = A.sum(axis=1)
    if np.any(sums <= 0):
        i = int(np.flatnonzero(sums <= 0)[0])
        raise DataError(f"data error at {cells.field}: {cells.path} row {i + 1}"
                        f"{f' (id {ids[i]})' if ids else ''} has no weight on any domain (fix: correct or drop that run)")
    off = np.flatnonzero(np.abs(sums - 1) > tolerance)
    if len(off) and not renormalise:
        i = int(off[0])
        raise DataError(f"data error at {cells.field}: {cells.path} row {i + 1}{f' (id {ids[i]})' if ids else ''} "
                        f"has weights summing to {sums[i]:.6g}, and {len(off) - 1} more rows are off 1 by more than "
                        f"{tolerance:g} (fix: pass --renormalise to rescale every row to 1, or check that the mixture "
                        "columns are all of the domains)")
    return A / sums[:, None], len(off)
