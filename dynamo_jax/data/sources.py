"""Prompt sources: JSONL, Parquet, locally prepared TFDS -> {id, prompt, answer}.  [host]

Every source yields plain dicts ``{"id": str, "prompt": str, "answer": str}``. ``fields`` maps those
three keys to the source's own columns (dotted paths reach into nested dicts, e.g.
``"reward_model.ground_truth"``). Errors name the file, the 1-based line/row and the field.

Nothing here downloads: TFDS datasets must already be prepared on local disk in the array_record
format (read through ``as_data_source``, which needs no TensorFlow).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

Record = dict[str, str]

DEFAULT_FIELDS: Mapping[str, str] = {"id": "id", "prompt": "problem", "answer": "answer"}
_KEYS = ("id", "prompt", "answer")


class DataError(ValueError):
    """A malformed or missing data file, row or field."""


def _check_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(DEFAULT_FIELDS)
    if fields:
        unknown = set(fields) - set(_KEYS)
        if unknown:
            raise ValueError(f"fields keys must be among {_KEYS}, got unknown {sorted(unknown)}")
        merged.update(fields)
    return merged


_MISSING = object()


def _lookup(row: Mapping[str, Any], path: str) -> Any:
    if path in row:
        return row[path]
    obj: Any = row
    for part in path.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def _as_text(value: Any, key: str) -> str | None:
    """Coerce a field to str; None when its type is wrong for that field."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return str(value)  # np.str_ -> str
    if key in ("id", "answer") and not isinstance(value, bool):
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float) and math.isfinite(value):
            value = float(value)  # np.float64 is a float whose repr is "np.float64(0.5)"
            return str(int(value)) if value.is_integer() and key == "id" else repr(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        if getattr(getattr(value, "dtype", None), "kind", "") == "f":
            # str() is the shortest text that round-trips in the value's own precision: "0.1"
            # for float32 0.1, where .item() widens it to "0.10000000149011612".
            value = float(str(value))
        return _as_text(value.item() if hasattr(value, "item") else value, key)
    return None


def to_record(
    row: Mapping[str, Any],
    fields: Mapping[str, str],
    *,
    where: str,
    derived_id: str | None,
) -> Record:
    """One raw row -> {id, prompt, answer}; `where` ("file:line 3") prefixes every error."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object/row, got {type(row).__name__}")
    out: Record = {}
    for key in _KEYS:
        column = fields[key]
        value = _lookup(row, column)
        if value is _MISSING or value is None:
            if key == "id" and derived_id is not None:
                out["id"] = derived_id
                continue
            hint = " (pass derive_ids=True to number rows instead)" if key == "id" else ""
            raise DataError(
                f"{where}: missing field {key!r} (column {column!r}){hint}; a run's config "
                f"names the column in data.{key}_field"
            )
        text = _as_text(value, key)
        if text is None:
            raise DataError(
                f"{where}: field {key!r} (column {column!r}) must be a string, "
                f"got {type(value).__name__}"
            )
        if not text.strip():  # an empty answer would score every response wrong, silently
            raise DataError(f"{where}: field {key!r} (column {column!r}) is empty")
        out[key] = text
    return out


class _Source:
    """Shared behaviour: iteration with duplicate-id detection, `load()`, `len()` after load."""

    fields: dict[str, str]
    derive_ids: bool
    name: str

    def _rows(self) -> Iterator[tuple[str, Any, int]]:  # (location, raw row, line/row number)
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        seen: dict[str, str] = {}
        for where, row, number in self._rows():
            # Numbered like the location errors name (a JSONL file's physical line, blank lines
            # included), so "train:3" is line 3.
            derived = f"{self.name}:{number}" if self.derive_ids else None
            record = to_record(row, self.fields, where=where, derived_id=derived)
            if record["id"] in seen:
                raise DataError(
                    f"duplicate prompt id {record['id']!r}: {seen[record['id']]} and {where}"
                )
            seen[record["id"]] = where
            yield record

    def load(self) -> list[Record]:
        """All records, validated, in source order."""
        return list(self)


class JsonlSource(_Source):
    """One JSON object per line; blank lines are skipped. Errors say `path:line N`."""

    def __init__(
        self,
        path: str | os.PathLike,
        fields: Mapping[str, str] | None = None,
        *,
        derive_ids: bool = False,
    ):
        self.path = os.fspath(path)
        self.fields = _check_fields(fields)
        self.derive_ids = derive_ids
        self.name = os.path.splitext(os.path.basename(self.path))[0]

    def _rows(self) -> Iterator[tuple[str, Any, int]]:
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:  # decoded line by line: errors can name the line
            for line_no, raw in enumerate(f, start=1):
                where = f"{self.path}:line {line_no}"
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
                yield where, row, line_no


class ParquetSource(_Source):
    """A Parquet file read with pyarrow, batch by batch, only the needed columns."""

    def __init__(
        self,
        path: str | os.PathLike,
        fields: Mapping[str, str] | None = None,
        *,
        derive_ids: bool = False,
        batch_size: int = 4096,
    ):
        self.path = os.fspath(path)
        self.fields = _check_fields(fields)
        self.derive_ids = derive_ids
        self.batch_size = batch_size
        self.name = os.path.splitext(os.path.basename(self.path))[0]

    def _rows(self) -> Iterator[tuple[str, Any, int]]:
        import pyarrow.parquet as pq

        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: no such file")
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:
            raise DataError(f"{self.path}: not a readable Parquet file ({e})") from None
        available = set(pf.schema_arrow.names)
        columns = []
        for key in _KEYS:
            column = self.fields[key]
            top = column if column in available else column.split(".")[0]
            if top not in available:
                if key == "id" and self.derive_ids:
                    continue
                raise DataError(
                    f"{self.path}: missing field {key!r}: no column {column!r} "
                    f"(columns: {sorted(available)}); a run's config names the column in "
                    f"data.{key}_field"
                )
            if top not in columns:
                columns.append(top)
        import pyarrow as pa

        # to_pylist() widens float32 to a Python float ("0.10000000149011612"): keep those
        # columns' values as numpy float32, whose text is the shortest in their own precision.
        narrow = [
            f.name
            for f in pf.schema_arrow
            if f.name in columns and (pa.types.is_float32(f.type) or pa.types.is_float16(f.type))
        ]
        # The same for float32 fields inside struct columns ("reward_model.ground_truth").
        nested = []
        for key in _KEYS:
            column = self.fields[key]
            if column in available or "." not in column:
                continue
            path = column.split(".")
            leaf = _nested_type(pf.schema_arrow.field(path[0]).type, path[1:])
            if leaf is not None and (pa.types.is_float32(leaf) or pa.types.is_float16(leaf)):
                nested.append(path)
        row_no = 0
        for batch in pf.iter_batches(batch_size=self.batch_size, columns=columns):
            rows = batch.to_pylist()
            for name in narrow:
                values = batch.column(name).to_numpy(zero_copy_only=False)
                for row, value in zip(rows, values, strict=True):
                    if row[name] is not None:
                        row[name] = value
            for path in nested:
                values = _nested_column(batch.column(path[0]), path[1:])
                for row, value in zip(rows, values, strict=True):
                    _set_nested(row, path, value)
            for row in rows:
                row_no += 1
                yield f"{self.path}:row {row_no}", row, row_no


def _nested_type(arrow_type: Any, path: list[str]) -> Any:
    """The Arrow type at `path` inside nested structs, or None where the path leaves them."""
    import pyarrow as pa

    for part in path:
        if not pa.types.is_struct(arrow_type) or arrow_type.get_field_index(part) < 0:
            return None
        arrow_type = arrow_type.field(part).type
    return arrow_type


def _nested_column(array: Any, path: list[str]) -> list[Any]:
    """The values at `path` inside a struct column as numpy float32/16 scalars (None where a
    struct or the value is null)."""
    import pyarrow.compute as pc

    valid = array.is_valid().to_pylist()
    for part in path:
        array = pc.struct_field(array, part)
        valid = [v and ok for v, ok in zip(valid, array.is_valid().to_pylist(), strict=True)]
    values = array.to_numpy(zero_copy_only=False)
    return [v if ok else None for v, ok in zip(values, valid, strict=True)]


def _set_nested(row: dict, path: list[str], value: Any) -> None:
    obj = row
    for part in path[:-1]:
        obj = obj.get(part) if isinstance(obj, dict) else None
        if obj is None:
            return
    if isinstance(obj, dict) and obj.get(path[-1]) is not None and value is not None:
        obj[path[-1]] = value


class TfdsSource(_Source):
    """A TFDS dataset already prepared under `data_dir` in the array_record format.

    Reads with ``tfds.builder(name, data_dir=...).as_data_source(split)`` (random access via
    array_record; no TensorFlow, no download). `name` may carry a version ("my_math:1.0.0").
    Datasets written by a builder class that is not imported here are opened read-only from
    their ``dataset_info.json``. Row numbers are 1-based indices into the split.
    """

    def __init__(
        self,
        name: str,
        data_dir: str | os.PathLike,
        split: str,
        fields: Mapping[str, str] | None = None,
        *,
        derive_ids: bool = False,
    ):
        self.dataset = name
        self.data_dir = os.fspath(data_dir)
        self.split = split
        self.fields = _check_fields(fields)
        self.derive_ids = derive_ids
        self.name = f"{name.split(':')[0]}/{split}"

    def _open(self):
        import tensorflow_datasets as tfds

        how = (
            f"prepare it locally first, e.g. builder.download_and_prepare(file_format="
            f"'array_record') with data_dir={self.data_dir!r}; nothing is downloaded at run time"
        )
        try:
            builder = tfds.builder(self.dataset, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(
                f"TFDS dataset {self.dataset!r} not found under {self.data_dir!r}: {how}"
            ) from None
        if not builder.is_prepared():
            raise DataError(
                f"TFDS dataset {self.dataset!r} is not prepared under {self.data_dir!r}: {how}"
            )
        try:
            return builder.as_data_source(self.split)
        except NotImplementedError:
            raise DataError(
                f"TFDS dataset {self.dataset!r} under {self.data_dir!r} is prepared as "
                f"{builder.info.file_format}; re-prepare it with file_format='array_record'"
            ) from None
        except (ValueError, KeyError) as e:
            raise DataError(f"TFDS dataset {self.dataset!r}: split {self.split!r}: {e}") from None

    def _rows(self) -> Iterator[tuple[str, Any, int]]:
        source = self._open()
        where = f"tfds {self.dataset!r} ({self.data_dir}) split {self.split!r}"
        for i in range(len(source)):
            yield f"{where}:row {i + 1}", source[i], i + 1


def load_records(sources: Iterable[Iterable[Record]]) -> list[Record]:
    """Concatenate several sources; prompt ids must stay unique across all of them."""
    out: list[Record] = []
    seen: dict[str, int] = {}
    for s_idx, source in enumerate(sources):
        for record in source:
            if record["id"] in seen:
                raise DataError(
                    f"duplicate prompt id {record['id']!r} across sources "
                    f"#{seen[record['id']] + 1} and #{s_idx + 1} (rows without an id column "
                    "are numbered <file name>:<line>: give such files distinct names or an id "
                    "column)"
                )
            seen[record["id"]] = s_idx
            out.append(record)
    return out
