"""A population: N agents stored as named columns of tensors, categorical columns with label maps."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lpm.errors import InputError

#: Key of the Parquet schema metadata that marks a file as an lpm population.
PARQUET_KEY = b"lpm.population"
#: 2: categorical columns dictionary-encoded (pandas shows labels); 1: bare codes (still read).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def smallest_int_dtype(low: int, high: int) -> torch.dtype:
    """The smallest torch integer dtype holding every value in ``[low, high]``."""
    for dtype in _INT_DTYPES:
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ValueError(f"no integer dtype holds the range [{low}, {high}]")


class Population:
    """N agents as columns of tensors, each in the smallest dtype that fits.

    Categorical columns hold integer codes into ``labels(name)``; numeric columns hold values;
    boolean columns hold flags.

    >>> pop = Population.synthesize("nyc", agents=10_000, seed=1)
    >>> len(pop), pop["borough"].dtype, pop.labels("borough")[:2]
    (10000, torch.uint8, ['Bronx', 'Brooklyn'])
    """

    def __init__(
        self,
        columns: Mapping[str, torch.Tensor],
        labels: Mapping[str, Iterable[str]] | None = None,
        *,
        meta: Mapping[str, Any] | None = None,
    ):
        if not columns:
            raise InputError("a population needs at least one column")
        lengths = {name: int(col.shape[0]) for name, col in columns.items()}
        if len(set(lengths.values())) != 1:
            raise InputError(f"population columns differ in length: {lengths}")
        self._columns: dict[str, torch.Tensor] = {}
        for name, col in columns.items():
            if col.ndim != 1:
                raise InputError(f"population column {name!r} must be 1-D, got shape {tuple(col.shape)}")
            self._columns[name] = col
        self._labels: dict[str, list[str]] = {k: [str(x) for x in v] for k, v in (labels or {}).items()}
        for name, labs in self._labels.items():
            if name not in self._columns:
                raise InputError(f"labels given for {name!r}, which is not a column")
            col = self._columns[name]
            if col.dtype not in _INT_DTYPES:
                raise InputError(f"categorical column {name!r} must hold integer codes, got {col.dtype}")
            if len(col) and (int(col.min()) < 0 or int(col.max()) >= len(labs)):
                raise InputError(
                    f"categorical column {name!r} has codes outside 0..{len(labs) - 1} ({len(labs)} labels)"
                )
        self.meta: dict[str, Any] = dict(meta or {})

    # -- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(next(iter(self._columns.values())).shape[0])

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._columns[name]
        except KeyError:
            raise KeyError(
                f"population has no column {name!r}; columns: {', '.join(self._columns)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._columns

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}:{str(v.dtype).removeprefix('torch.')}" for k, v in self._columns.items())
        return f"Population({len(self):,} agents; {cols})"

    @property
    def columns(self) -> list[str]:
        """Column names in storage order."""
        return list(self._columns)

    def labels(self, name: str) -> list[str]:
        """Labels of categorical column ``name``: code ``i`` means ``labels(name)[i]``."""
        self[name]  # raises a clear KeyError for an unknown column
        if name not in self._labels:
            raise KeyError(f"column {name!r} is not categorical (it has no labels)")
        return list(self._labels[name])

    def is_categorical(self, name: str) -> bool:
        return name in self._labels

    @property
    def nbytes(self) -> int:
        """Bytes held by the column tensors."""
        return sum(c.element_size() * c.numel() for c in self._columns.values())

    def to(self, device: str | torch.device) -> Population:
        """A copy with every column on ``device``."""
        return Population({k: v.to(device) for k, v in self._columns.items()}, self._labels, meta=self.meta)

    def to_pandas(self) -> pd.DataFrame:
        """One row per agent; categorical columns become ``pandas.Categorical`` with their labels."""
        data = {}
        for name, col in self._columns.items():
            values = col.cpu().numpy()
            if name in self._labels:
                data[name] = pd.Categorical.from_codes(values, categories=self._labels[name])
            else:
                data[name] = values
        return pd.DataFrame(data, copy=False)

    def counts(self, by: str | list[str]) -> pd.DataFrame:
        """Number of agents per value (or combination of values) of categorical columns ``by``."""
        by = [by] if isinstance(by, str) else list(by)
        frame = self.to_pandas()[by]
        out = frame.groupby(by, observed=True).size().rename("agents").reset_index()
        out["share"] = out["agents"] / len(self)
        return out

    # -- storage --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the population as one Parquet file: categorical columns dictionary-encoded (their codes
        index the labels, so ``pandas.read_parquet`` shows ``Bronx``, ``10001``), flags and values as they
        are; labels, dtypes and ``meta`` also in the schema metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name, col in self._columns.items():
            values = pa.array(col.cpu().numpy())
            if name in self._labels:
                values = pa.DictionaryArray.from_arrays(values, pa.array(self._labels[name], pa.string()))
            arrays[name] = values
        header = {
            "format_version": FORMAT_VERSION,
            "labels": self._labels,
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in self._columns.items()},
            "meta": self.meta,
        }
        table = pa.table(arrays).replace_schema_metadata({PARQUET_KEY: json.dumps(header).encode()})
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Population:
        """Read a population written by :meth:`save`; a foreign or corrupt file raises :class:`InputError`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(
                f"{path}: no such population file",
                hint="create one with `lpm population synth nyc --out PATH`",
            )
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
        raw = (schema.metadata or {}).get(PARQUET_KEY)
        if raw is None:
            raise InputError(
                f"{path}: not an lpm population (the Parquet metadata has no field {PARQUET_KEY.decode()!r})",
                hint="populations are written by `lpm population synth` or Population.save()",
            )
        try:
            header = json.loads(raw)
            labels, dtypes = header["labels"], header["dtypes"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{path}: field {PARQUET_KEY.decode()!r} of the Parquet metadata is corrupt ({exc})"
            ) from None
        if header.get("format_version") not in READABLE_VERSIONS:
            raise InputError(
                f"{path}: field 'format_version' is {header.get('format_version')!r}; this lpm reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: Parquet data is corrupt ({exc})") from None
        columns = {}
        for name, dtype_name in dtypes.items():
            if name not in table.column_names:
                raise InputError(
                    f"{path}: column {name!r} is listed in the metadata but missing from the data"
                )
            values = _codes(path, name, table.column(name), labels.get(name))
            dtype = getattr(torch, dtype_name, None)
            if not isinstance(dtype, torch.dtype):
                raise InputError(f"{path}: column {name!r} has unknown dtype {dtype_name!r}")
            columns[name] = torch.from_numpy(np.require(values, requirements=["C", "W"])).to(dtype)
        try:
            return cls(columns, labels, meta=header.get("meta") or {})
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def synthesize(cls, recipe: str = "nyc", *, agents: int | None = None, seed: int = 0) -> Population:
        """Build a synthetic population from a recipe in ``populations/`` (``"nyc"``: New York City).

        ``agents=None`` builds the full population the data describe; a smaller ``agents`` keeps the
        same shares. The same ``seed`` always gives the same population.
        """
        from lpm.synthesis import synthesize

        return synthesize(recipe, agents=agents, seed=seed)


def _codes(path: Path, name: str, column: pa.ChunkedArray, labels: list[str] | None) -> np.ndarray:
    """The values of a stored column; a dictionary-encoded one as codes into ``labels`` (the order kept in
    the metadata), whatever order the file's dictionary has."""
    if not pa.types.is_dictionary(column.type):
        return column.to_numpy()
    if labels is None:
        raise InputError(
            f"{path}: column {name!r} is dictionary-encoded but the metadata lists no labels for it"
        )
    if column.null_count:
        raise InputError(f"{path}: column {name!r} has {column.null_count} missing values")
    column = column.unify_dictionaries() if column.num_chunks > 1 else column
    if column.num_chunks == 0:
        return np.zeros(0, dtype=np.int64)
    dictionary = column.chunk(0).dictionary.to_pylist()
    unknown = sorted(set(dictionary) - set(labels))
    if unknown:
        raise InputError(f"{path}: column {name!r} holds values {unknown[:5]} that are not among its labels")
    lookup = np.array([labels.index(v) for v in dictionary], dtype=np.int64)
    indices = np.concatenate([chunk.indices.to_numpy(zero_copy_only=False) for chunk in column.chunks])
    return lookup[indices.astype(np.int64)]
