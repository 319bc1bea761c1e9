"""Read the records of dataset files.

A dataset's `file_name` is a file or a folder. Readable files: `.json` (one JSON list of records;
a `.json` file that actually holds JSON Lines is read as such), `.jsonl` (one record per line,
blank lines ignored), `.parquet` and `.csv` (through pyarrow; a CSV column of true/false becomes
booleans). A folder is read as its files in sorted name order; they must share one extension, and
names starting with "." or "_" (`.DS_Store`, `_SUCCESS`) are ignored. Record indexes are 0-based
and count per file, so `origin` ("path#index") and error messages point at the exact record.
"""

from __future__ import annotations

import json
import os
import sys

from prospect.data.registry import json_type
from prospect.errors import UserError

READABLE_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")


class UnreadableLine:
    """Stands in for a JSONL line that is not valid JSON, so it can be skipped like a record."""

    __slots__ = ("lineno", "problem")

    def __init__(self, lineno: int, problem: str):
        self.lineno = lineno
        self.problem = problem


def data_files(path: str) -> list[str]:
    """The data files behind a dataset path: the file itself, or a folder's files in name order.

    Raises UserError for a missing path, an unreadable extension, an empty folder, a folder with
    subfolders or with files of different extensions.
    """
    if os.path.isfile(path):
        _check_extension(path)
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such file or folder. Check file_name and dataset_dir.")
    files = []
    for name in sorted(os.listdir(path)):
        if name.startswith((".", "_")):  # .DS_Store, _SUCCESS and similar bookkeeping files
            continue
        full = os.path.join(path, name)
        if os.path.isdir(full):
            raise UserError(
                f"{full}: a folder dataset is read one level deep, and this is a subfolder: "
                f"move its files up or name it as its own dataset."
            )
        files.append(full)
    if not files:
        raise UserError(f"{path}: the folder holds no data files.")
    for full in files:
        _check_extension(full)
    extension = _extension(files[0])
    for full in files[1:]:
        if _extension(full) != extension:
            raise UserError(
                f"{path}: a folder dataset needs files of one kind, but it mixes {files[0]} and "
                f"{full}: convert them to one format or move the odd ones out."
            )
    return files


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _check_extension(path: str) -> None:
    extension = _extension(path)
    if extension in READABLE_EXTENSIONS:
        return
    if extension == ".txt":
        raise UserError(
            f"{path}: plain-text files hold pre-training data, and prospect trains sft and kto: "
            f"convert it to .json/.jsonl records with a prompt and a response."
        )
    raise UserError(
        f"{path}: cannot read files of type \"{extension or '(no extension)'}\"; use one of "
        f"{', '.join(READABLE_EXTENSIONS)}."
    )


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: tolerate a byte-order mark
            return handle.read()
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start}): save it as UTF-8."
        ) from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror}).") from None


def _parse_jsonl(text: str, path: str) -> list:
    """Records of a JSON Lines text; a line that is not valid JSON becomes an UnreadableLine. A last
    line that is cut off (invalid and without its newline: a writer stopped mid-line, e.g. a killed
    `prospect serve` appending feedback) is left out with a warning."""
    records: list = []
    loads = json.loads
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(loads(line))
        except json.JSONDecodeError as err:
            records.append(UnreadableLine(lineno, f"{err.msg} at column {err.colno}"))
    if records and isinstance(records[-1], UnreadableLine) and not text.endswith("\n"):
        torn = records.pop()
        print(f"warning: {path}: line {torn.lineno}, the last, is cut off ({torn.problem}); it is left out.",
              file=sys.stderr, flush=True)
    return records


def _read_json(path: str) -> list:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # Many JSON Lines files are named .json (the `datasets` library reads both); a JSON Lines
        # text fails here with "Extra data" right after the first object.
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text, path)
        raise UserError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}. "
            f"A .json dataset must be one JSON list of records: fix the file there."
        ) from None
    if isinstance(data, dict):
        # One object alone on its line is a one-record JSON Lines file; anything else is not a list.
        if "\n" not in text.strip():
            return [data]
        raise UserError(
            f"{path}: the file holds one JSON object, but a dataset is a JSON list of records "
            f"([{{...}}, {{...}}]) or JSON Lines (one object per line)."
        )
    if not isinstance(data, list):
        raise UserError(
            f"{path}: expected a JSON list of records, got {json_type(data)}."
        )
    return data


def _read_jsonl(path: str) -> list:
    return _parse_jsonl(_read_text(path), path)


def _read_parquet(path: str) -> list:
    import pyarrow.parquet as pq  # lazy: keep `import prospect.data.formats` light

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
        raise UserError(f"{path}: cannot read it as Parquet ({err}).") from None


def _read_csv(path: str) -> list:
    import pyarrow.csv as pacsv  # lazy, as above

    try:
        return pacsv.read_csv(path).to_pylist()
    except Exception as err:
        raise UserError(f"{path}: cannot read it as CSV ({err}).") from None


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet,
            ".csv": _read_csv}


def read_file_records(path: str) -> list:
    """All records of one data file, in file order; an invalid JSON Lines line is an UnreadableLine."""
    return _READERS[_extension(path)](path)


def read_records(path: str) -> list:
    """All records of one data file, as Python values (normally dicts), in file order.

    A JSON Lines line that is not valid JSON raises UserError with its line number.
    """
    records = read_file_records(path)
    for index, record in enumerate(records):
        if isinstance(record, UnreadableLine):
            raise UserError(unreadable_message(path, index, record))
    return records


def unreadable_message(path: str, index: int, line: UnreadableLine) -> str:
    return (
        f"{path}: record {index} (line {line.lineno}): invalid JSON ({line.problem}). Each line "
        f"of a JSON Lines file must be one complete JSON object: fix or remove line {line.lineno}."
    )
