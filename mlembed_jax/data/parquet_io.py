"""Parquet tables in and out of the data pipeline: reading them (local or URL), checking
their columns, with `DataError` naming the file, the row and the column; and the list<int32>
column the prepared files store token ids in. Writing a table is `storage.write_table_atomic`.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlembed_jax import storage

_NEG_RE = re.compile(r"^negative_(\d+)$")


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the column."""


def read_parquet(path: str) -> pa.Table:
    """The table at `path`; from a URL it is read through a streaming file (ranged reads of
    the footer and columns), not downloaded first."""
    try:
        if storage.is_url(path):
            with storage.open(path, "rb") as f:
                return pq.read_table(f)
        return pq.read_table(path)
    except Exception as e:  # arrow raises several types for bad files
        raise DataError(f"{path}: cannot read parquet file (corrupted or truncated?): "
                        f"{type(e).__name__}: {e}") from e


def negative_columns(column_names: list[str], path: str) -> list[str]:
    """negative_1 .. negative_K of a file's columns, checked to be contiguous; at least
    negative_1."""
    nums = sorted(int(m.group(1)) for c in column_names if (m := _NEG_RE.match(c)))
    if not nums:
        raise DataError(f"{path}: missing column 'negative_1' (need query, passage, "
                        f"negative_1 .. negative_K; found {list(column_names)})")
    for want, got in enumerate(nums, start=1):
        if want != got:
            raise DataError(f"{path}: missing column 'negative_{want}' (negatives must be "
                            f"numbered 1..K without gaps; found up to negative_{nums[-1]})")
    return [f"negative_{i}" for i in nums]


def _is_string_type(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t))


def check_text_column(table: pa.Table, column: str, path: str) -> list[str]:
    """Returns the column as Python strings; errors name the first bad row."""
    if column not in table.column_names:
        raise DataError(f"{path}: missing column {column!r} (found {table.column_names})")
    if table.column_names.count(column) > 1:
        raise DataError(f"{path}: column {column!r} appears {table.column_names.count(column)} "
                        "times; keep one")
    col = table.column(column)
    if pa.types.is_dictionary(col.type) and _is_string_type(col.type.value_type):
        col = col.cast(col.type.value_type)  # categorical strings (e.g. pandas 'category')
    if not _is_string_type(col.type):
        valid = pc.indices_nonzero(pc.is_valid(col)) if len(col) else pa.array([])
        row = valid[0].as_py() if len(valid) else 0
        value = col[row].as_py() if len(col) else None
        raise DataError(f"{path}: row {row}, column {column!r}: expected a string, got "
                        f"{col.type} value {value!r}")
    _check_utf8(col, column, path)
    nulls = pc.indices_nonzero(pc.is_null(col))
    if len(nulls):
        raise DataError(f"{path}: row {nulls[0].as_py()}, column {column!r}: null text "
                        f"({len(nulls)} null cells in this column)")
    empty = pc.indices_nonzero(pc.equal(pc.utf8_trim_whitespace(col), ""))
    if len(empty):
        raise DataError(f"{path}: row {empty[0].as_py()}, column {column!r}: empty text "
                        f"({len(empty)} empty cells in this column)")
    return col.to_pylist()


def _check_utf8(col: pa.ChunkedArray, column: str, path: str) -> None:
    """Parquet does not validate string bytes; name the first row that is not UTF-8."""
    try:
        col.validate(full=True)
    except pa.ArrowInvalid:
        _name_invalid_utf8(col, column, path)


def _name_invalid_utf8(col: pa.ChunkedArray, column: str, path: str) -> None:
    """Raises DataError naming the first row of `col` (which failed validation) that is not
    UTF-8, or the column when no single row is to blame."""
    row = 0
    for chunk in col.chunks:
        for value in chunk.view(pa.binary() if chunk.type == pa.string() else pa.large_binary()):
            raw = value.as_py()
            try:
                if raw is not None:
                    raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: row {row}, column {column!r}: invalid UTF-8 "
                                f"({e.reason} at byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                                "write the file with UTF-8 text") from None
            row += 1
    raise DataError(f"{path}: column {column!r} does not validate as UTF-8 text") from None


def list_array(arrays: list[np.ndarray]) -> pa.Array:
    """A list<int32> array with one list per input array (the token ids of one text each)."""
    lengths = np.fromiter((len(a) for a in arrays), np.int64, len(arrays))
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
