"""A population: N agents stored as named columns of tensors, categorical columns with label maps."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from lpm.errors import InputError

#: Key of the Parquet schema metadata that marks a file as an lpm population.
PARQUET_KEY = b"lpm.population"
#: 2: categorical columns dictionary-encoded (pandas shows labels); 1: bare codes (still read).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _distinct_labels(name: str, labels: list[str]) -> list[str]:
    """``labels`` of column ``name``, refused if one repeats (a code would then have no single meaning)."""
    repeated = [label for label, n in Counter(labels).items() if n > 1]
    if repeated:
        raise InputError(
            f"labels of column {name!r} repeat {', '.join(map(repr, repeated[:5]))}: each code needs its own "
            f"label ({len(labels)} labels, {len(set(labels))} distinct)",
            hint="list every label once",
        )
    return labels


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
        self._labels: dict[str, list[str]] = {}
        for name, labs in (labels or {}).items():
            if isinstance(labs, str | bytes) or not isinstance(labs, Iterable):
                raise InputError(f"labels of column {name!r} must be a list of text, got {labs!r}")
            self._labels[name] = _distinct_labels(name, [str(x) for x in labs])
        for name, labs in self._labels.items():
            if name not in self._columns:
                raise InputError(f"labels given for {name!r}, which is not a column")
            col = self._columns[name]
            if col.dtype not in _INT_DTYPES:
                raise InputError(f"categorical column {name!r} must hold integer codes, got {col.dtype}")
            outside = (col < 0) | (col >= len(labs))
            if bool(outside.any()):
                raise _bad_values(
                    None,
                    name,
                    None,
                    outside.cpu().numpy(),
                    col.cpu().numpy(),
                    f"hold codes outside 0..{len(labs) - 1} ({len(labs)} labels)",
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
        from lpm.paths import file_parent, os_error

        path = file_parent(path, field="population file")
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
        try:
            pq.write_table(table, tmp, compression="zstd")
            tmp.replace(path)
        except OSError as exc:
            raise os_error(path, exc, "the population") from None
        finally:
            tmp.unlink(missing_ok=True)
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
        if not isinstance(labels, dict) or not isinstance(dtypes, dict):
            raise InputError(
                f"{path}: field {PARQUET_KEY.decode()!r} of the Parquet metadata is corrupt "
                "('labels' and 'dtypes' must be mappings)"
            )
        for name, labs in labels.items():
            if not isinstance(labs, list):
                raise InputError(
                    f"{path}: field 'labels.{name}' of the Parquet metadata must be a list, got {labs!r}"
                )
            try:
                _distinct_labels(name, [str(x) for x in labs])
            except InputError as exc:
                raise InputError(f"{path}: field 'labels.{name}': {exc}", hint=exc.hint) from None
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
            dtype = getattr(torch, str(dtype_name), None)
            if not isinstance(dtype, torch.dtype):
                raise InputError(f"{path}: column {name!r} has unknown dtype {dtype_name!r}")
            values = _codes(path, name, table.column(name), labels.get(name), dtype)
            columns[name] = torch.from_numpy(np.require(values, requirements=["C", "W"])).to(dtype)
        try:
            return cls(columns, labels, meta=header.get("meta") or {})
        except InputError as exc:
            raise InputError(f"{path}: {exc}", hint=exc.hint) from None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def synthesize(
        cls,
        recipe: str = "nyc",
        *,
        agents: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        chunk_agents: int | None = None,
        progress: bool = False,
    ) -> Population:
        """Build a synthetic population from a recipe in ``populations/`` (``"nyc"``: New York City).

        ``agents=None`` builds the full population the data describe; a smaller or larger ``agents``
        keeps the same shares and household structure. The same ``seed`` on the same kind of device
        always gives the same population (a GPU's random numbers differ from the CPU's).

        A population larger than ``chunk_agents`` (default: the full population the data describe) is
        built in chunks of (nearly) equal size, each alone and laid end to end, so that synthesis holds
        one chunk's temporaries at a time; ``device`` is where the columns are built and kept (on a GPU
        they never pass through host memory). ``progress`` shows a bar over the chunks on stderr.
        """
        from lpm.synthesis import synthesize

        return synthesize(
            recipe, agents=agents, seed=seed, device=device, chunk_agents=chunk_agents, progress=progress
        )


def _codes(
    path: Path, name: str, column: pa.ChunkedArray, labels: list[str] | None, dtype: torch.dtype
) -> np.ndarray:
    """The values of a stored column, checked to fit ``dtype`` (the dtype the metadata declares); a
    dictionary-encoded (or text) column with labels as codes into ``labels`` (the order kept in the
    metadata), whatever order the file's dictionary has. O(N), vectorised."""
    rows = len(column)
    if column.null_count:
        missing = pc.is_null(column).to_numpy(zero_copy_only=False)
        raise _bad_values(path, name, dtype, missing, None, "are missing (null)")
    if labels is not None and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.dictionary_encode()  # labels written out as text: read them as labels
    if not pa.types.is_dictionary(column.type):
        return _checked_values(path, name, column, dtype)
    if labels is None:
        raise InputError(
            f"{path}: column {name!r} is dictionary-encoded but the metadata lists no labels for it"
        )
    column = column.unify_dictionaries() if column.num_chunks > 1 else column
    if column.num_chunks == 0 or rows == 0:
        return np.zeros(0, dtype=np.int64)
    dictionary = column.chunk(0).dictionary.to_pylist()
    position = {label: i for i, label in enumerate(labels)}
    lookup = np.array([position.get(v, -1) for v in dictionary], dtype=np.int64)
    indices = np.concatenate([chunk.indices.to_numpy(zero_copy_only=False) for chunk in column.chunks])
    codes = lookup[indices.astype(np.int64)]
    if (lookup < 0).any():
        shown = ", ".join(labels[:10]) + (" …" if len(labels) > 10 else "")
        error = _bad_values(
            path,
            name,
            None,
            codes < 0,
            np.asarray(dictionary, dtype=object)[indices],
            "are not among its labels",
        )
        raise InputError(str(error), hint=f"its labels (metadata field 'labels.{name}'): {shown}")
    return codes


def _checked_values(path: Path, name: str, column: pa.ChunkedArray, dtype: torch.dtype) -> np.ndarray:
    """The values of a plain (not dictionary-encoded) column with no nulls, refused unless every value
    fits ``dtype``: numbers (or flags) only, whole numbers within range for an integer dtype, 0/1 or
    true/false for ``bool``, finite-or-NaN within range for a float dtype."""
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        values = column.to_numpy(zero_copy_only=False)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            text = pd.to_numeric(pd.Series(values), errors="coerce").isna().to_numpy()
            bad = text if text.any() else np.ones(len(values), dtype=bool)
            wanted = "flags (true/false)" if dtype == torch.bool else "numbers"
            raise _bad_values(path, name, dtype, bad, values, f"are text, not {wanted}")
        raise InputError(
            f"{path}: column {name!r} has Parquet type {kind}, not numbers that fit its dtype "
            f"{_dtype_name(dtype)} ({len(column):,} rows)",
            hint=f"store numbers of dtype {_dtype_name(dtype)} in it (e.g. with Population.save)",
        )
    values = column.to_numpy()
    if dtype == torch.bool:
        if pa.types.is_boolean(kind):
            return values
        bad = (values != 0) & (values != 1)
        if bad.any():
            raise _bad_values(path, name, dtype, bad, values, "are not flags (true/false or 1/0)")
        return values.astype(bool)
    if dtype.is_floating_point:
        limit = torch.finfo(dtype).max
        with np.errstate(invalid="ignore"):
            bad = np.abs(values.astype(np.float64)) > limit  # NaN stays allowed: a number, not a null
        if bad.any():
            raise _bad_values(path, name, dtype, bad, values, f"are outside ±{limit:g}")
        return values
    try:
        info = torch.iinfo(dtype)
    except TypeError:
        raise InputError(
            f"{path}: column {name!r} has dtype {_dtype_name(dtype)}, which lpm does not read",
            hint="use an integer, float or bool dtype",
        ) from None
    if pa.types.is_floating(kind):
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values != np.floor(values))
        if bad.any():
            raise _bad_values(path, name, dtype, bad, values, "are not whole numbers")
    if not pa.types.is_boolean(kind):
        bad = (values < info.min) | (values > info.max)
        if bad.any():
            raise _bad_values(path, name, dtype, bad, values, f"are outside {info.min}..{info.max}")
    return values


def _bad_values(
    path: Path | None,
    name: str,
    dtype: torch.dtype | None,
    bad: np.ndarray,
    values: np.ndarray | None,
    what: str,
) -> InputError:
    """An error naming the file, the column, how many of its rows are bad and the first few (rows and values).

    path: the file (None: a population built in memory). dtype: the column's declared dtype (None: not
    named). bad: (N,) bool, the bad rows. values: (N,) the column's values, or None where none are to show.
    """
    rows = np.flatnonzero(bad)
    first = rows[:5]
    if values is None:
        shown = f"at rows {', '.join(map(str, first.tolist()))}"
    else:
        shown = ", ".join(
            f"{v!r} (row {r})" for r, v in zip(first.tolist(), values[first].tolist(), strict=True)
        )
    more = " …" if len(rows) > len(first) else ""
    where = f"{path}: " if path is not None else ""
    kind = f" (dtype {_dtype_name(dtype)})" if dtype is not None else ""
    return InputError(
        f"{where}column {name!r}{kind}: {len(rows):,} of {len(bad):,} rows {what}: {shown}{more}",
        hint=None
        if dtype is None
        else f"rewrite the column with values that fit {_dtype_name(dtype)} (or change its dtype in the "
        f"metadata field {PARQUET_KEY.decode()!r}), or rebuild the population with `lpm population synth`",
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
