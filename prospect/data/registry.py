"""`dataset_info.json`: the registry of named datasets, read the way LLaMA-Factory v0.9.3 reads it.

A run names its datasets with `dataset: a,b` and points `dataset_dir` at the folder that holds
`dataset_info.json`. Each entry of that file says where the data lives and how it is laid out:

    "kto_en_demo": {
        "file_name": "kto_en_demo.json",              # file or folder, relative to dataset_dir
        "formatting": "sharegpt",                     # alpaca (default) | sharegpt | trl | nemo
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content",
                 "user_tag": "user", "assistant_tag": "assistant"}
    }

This module turns entries into typed `DatasetSpec`s and decides, for the selected names only,
whether they can be trained on here. How the records inside the file are read and converted is
`prospect.data.formats`' job.

Rules (where they differ from LLaMA-Factory, they only reject mistakes it would silently ignore,
or accept something it cannot load):

- Every key LLaMA-Factory v0.9.3 knows is accepted, including the ones that only matter for hub
  data (`subset`, `split`, `folder`, `revision`) and `num_samples` (kept on the spec, not applied
  here). An unknown key - in the entry, under `columns` or under `tags` - is an error naming the
  entry, the key and the closest known key, because a typo such as `"colums"` would otherwise
  train on the wrong fields without a word.
- `resolve_datasets` checks only the selected entries for what this machine can do: data on a
  hub (`hf_hub_url`, `ms_hub_url`, `om_hub_url`), a loading script or a cloud bucket cannot be
  fetched (no network), so selecting one is an error that says how to get a local copy; an entry
  that also has a `file_name` whose file exists is read from that file instead. `ranking: true`
  (pairwise DPO/RM data) and image/video/audio columns are errors: prospect trains text-only SFT
  and KTO.
- A selected name that is not an entry but is an existing file or folder (absolute, relative to
  `dataset_dir`, or relative to the working directory) is a dataset of its own, with its format
  detected from its first record; `dataset_info.json` is then not needed at all.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field

from prospect.errors import UserError

DATA_CONFIG = "dataset_info.json"

# The `formatting` values we read: LLaMA-Factory's two, plus TRL's prompt/completion(/label)
# layout, NeMo-Aligner's KTO JSONL and the OpenAI `messages` layout (newer LLaMA-Factory).
FORMATTINGS = ("alpaca", "sharegpt", "trl", "nemo", "openai")

# Column roles an entry may map under "columns" (LLaMA-Factory's DatasetAttr column fields).
COLUMN_KEYS = (
    "prompt",
    "query",
    "response",
    "history",
    "messages",
    "system",
    "tools",
    "kto_tag",
    "chosen",
    "rejected",
    "images",
    "videos",
    "audios",
)
MEDIA_COLUMN_KEYS = ("images", "videos", "audios")

# ShareGPT tag names and LLaMA-Factory's defaults for them.
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}

# Entry keys with a plain string value; `file_name` and the hub addresses are the data sources.
_STRING_KEYS = (
    "file_name",
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
    "subset",
    "split",
    "folder",
    "load_from",
    "revision",
    "file_sha1",  # written by older LLaMA-Factory releases; ignored
)
ENTRY_KEYS = _STRING_KEYS + ("formatting", "ranking", "num_samples", "columns", "tags")

_HUB_NAMES = {
    "hf_hub_url": ("the Hugging Face hub", "HF_HUB_OFFLINE"),
    "ms_hub_url": ("the ModelScope hub", None),
    "om_hub_url": ("the Modelers (openMind) hub", None),
}


@dataclass
class DatasetSpec:
    """One dataset to read: a `dataset_info.json` entry, or a path named directly in `dataset`.

    `formatting` is None when the entry does not say (LLaMA-Factory then means alpaca; see
    `prospect.data.formats` for when the format is detected instead). `columns` and `tags` hold
    exactly what the entry wrote; the defaults are applied by the format converters, because
    LLaMA-Factory's defaults depend on whether `columns` was given at all. `info_path` is the
    `dataset_info.json` the entry came from, or None for a dataset given by path.
    """

    name: str
    file_name: str | None = None
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None
    formatting: str | None = None
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    load_from: str | None = None
    revision: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    info_path: str | None = None
    has_columns: bool = False  # whether the entry had a "columns" object (even an empty one)

    @property
    def hub_url(self) -> str | None:
        """The hub address LLaMA-Factory would download from, if the entry has one."""
        return self.hf_hub_url or self.ms_hub_url or self.om_hub_url

    def data_path(self, dataset_dir: str) -> str | None:
        """The local file or folder of this dataset (`file_name` joined to `dataset_dir`)."""
        if self.file_name is None:
            return None
        return os.path.join(dataset_dir, self.file_name)

    def describe(self) -> str:
        """Where the spec came from, for error messages: 'dataset "x" in data/dataset_info.json'."""
        if self.info_path is None:
            return f'dataset "{self.name}"'
        return f'dataset "{self.name}" in {self.info_path}'


def _closest(word: str, candidates) -> str:
    """' (did you mean "x"?)' for the closest candidate, or '' when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f' (did you mean "{match[0]}"?)' if match else ""


def json_type(value) -> str:
    """The JSON name of a value's type ("a string", "an object", ...), for messages a user who wrote
    JSON will understand."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def parse_entry(name: str, entry, info_path: str) -> DatasetSpec:
    """Validate one `dataset_info.json` entry and return it as a `DatasetSpec`.

    Raises UserError naming `info_path`, the entry and the offending key.
    """
    where = f'{info_path}: dataset "{name}"'
    if not isinstance(entry, dict):
        raise UserError(
            f"{where}: expected an object such as {{\"file_name\": \"data.json\"}}, "
            f"got {json_type(entry)}."
        )
    for key in entry:
        if key not in ENTRY_KEYS:
            raise UserError(
                f'{where}: unknown key "{key}"{_closest(key, ENTRY_KEYS)}. '
                f"Known keys: {', '.join(ENTRY_KEYS)}."
            )

    values: dict = {}
    for key in _STRING_KEYS:
        if key in entry:
            value = entry[key]
            if not isinstance(value, str) or not value:
                raise UserError(
                    f'{where}: key "{key}": expected a non-empty string, got {json_type(value)}.'
                )
            values[key] = value
    values.pop("file_sha1", None)

    if "formatting" in entry:
        formatting = entry["formatting"]
        if formatting not in FORMATTINGS:
            shown = json.dumps(formatting, ensure_ascii=False)
            raise UserError(
                f'{where}: key "formatting": unknown value {shown}; expected one of '
                f"{', '.join(FORMATTINGS)}."
            )
        values["formatting"] = formatting

    if "ranking" in entry:
        if not isinstance(entry["ranking"], bool):
            raise UserError(
                f'{where}: key "ranking": expected true or false, '
                f"got {json_type(entry['ranking'])}."
            )
        values["ranking"] = entry["ranking"]

    if "num_samples" in entry:
        num = entry["num_samples"]
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise UserError(
                f'{where}: key "num_samples": expected a positive whole number, got {num!r}.'
            )
        values["num_samples"] = num

    for group, known in (("columns", COLUMN_KEYS), ("tags", tuple(DEFAULT_TAGS))):
        if group not in entry:
            continue
        mapping = entry[group]
        if not isinstance(mapping, dict):
            raise UserError(
                f'{where}: key "{group}": expected an object, got {json_type(mapping)}.'
            )
        for key, value in mapping.items():
            if key not in known:
                raise UserError(
                    f'{where}: key "{group}.{key}": unknown {group[:-1]}{_closest(key, known)}. '
                    f"Known: {', '.join(known)}."
                )
            if not isinstance(value, str) or not value:
                raise UserError(
                    f'{where}: key "{group}.{key}": expected a non-empty string (the name used '
                    f"in the data file), got {json_type(value)}."
                )
        values[group] = dict(mapping)

    sources = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url",
               "cloud_file_name")
    if not any(key in values for key in sources):
        raise UserError(
            f'{where}: says nowhere where the data is: add "file_name" (a file or folder '
            f"relative to dataset_dir) or a hub address such as \"hf_hub_url\"."
        )

    return DatasetSpec(name=name, info_path=info_path, has_columns="columns" in entry, **values)


def _read_info(info_path: str) -> dict:
    """Read `dataset_info.json` as a dict of raw entries; UserError when it is not valid JSON."""
    try:
        with open(info_path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise UserError(f"{info_path}: cannot read it ({err.strerror}).") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{info_path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}."
        ) from None
    if not isinstance(info, dict):
        raise UserError(
            f"{info_path}: expected an object that maps dataset names to entries, "
            f"got {json_type(info)}."
        )
    return info


def load_registry(dataset_dir: str) -> dict[str, DatasetSpec]:
    """Parse every entry of `dataset_dir/dataset_info.json`, strictly, in file order."""
    info_path = os.path.join(dataset_dir, DATA_CONFIG)
    if not os.path.isfile(info_path):
        raise UserError(
            f"{info_path}: not found. Set dataset_dir to the folder that holds {DATA_CONFIG}."
        )
    raw_info = _read_info(info_path)
    return {name: parse_entry(name, entry, info_path) for name, entry in raw_info.items()}


def _hub_error(spec: DatasetSpec) -> UserError:
    """The error for a selected entry whose data is only on a hub, in a script or a bucket."""
    for key, (hub_name, offline_var) in _HUB_NAMES.items():
        url = getattr(spec, key)
        if url is None:
            continue
        offline = ""
        flag = os.environ.get(offline_var, "") if offline_var else ""
        if flag.strip().lower() in ("1", "true", "yes", "on"):
            offline = f" ({offline_var} is set)"
        missing = ""
        if spec.file_name is not None:
            missing = f' (its "file_name" {spec.file_name} is not in dataset_dir either)'
        where = f"{spec.info_path}: " if spec.info_path else ""
        return UserError(
            f"{where}dataset {spec.name} lives on {hub_name} ({url}), which this machine cannot "
            f"reach{offline}: download it and point `file_name` at the local copy{missing}."
        )
    if spec.script_url is not None:
        return UserError(
            f"{spec.describe()}: key \"script_url\": datasets built by a loading script "
            f"({spec.script_url}) are not supported: export the data to a .json, .jsonl, "
            f".parquet or .csv file and point `file_name` at it."
        )
    return UserError(
        f"{spec.describe()}: key \"cloud_file_name\": data in cloud storage "
        f"({spec.cloud_file_name}) cannot be fetched from this machine: download it and point "
        f"`file_name` at the local copy."
    )


def check_trainable(spec: DatasetSpec, dataset_dir: str) -> None:
    """Raise UserError unless `spec` is text SFT/KTO data that exists on this machine."""
    if spec.ranking:
        raise UserError(
            f'{spec.describe()}: "ranking": true marks pairwise preference data (chosen/rejected, '
            f"for DPO or reward models). prospect trains sft and kto; pairwise data is not "
            f"supported. For KTO, give each completion its own record with a boolean label "
            f'(true = desirable) and map it with "kto_tag" under "columns".'
        )
    media = [key for key in MEDIA_COLUMN_KEYS if key in spec.columns]
    if media:
        raise UserError(
            f'{spec.describe()}: key "columns.{media[0]}": prospect trains text-only models, so '
            f"datasets with {'/'.join(media)} are not supported: pick a text dataset."
        )
    path = spec.data_path(dataset_dir)
    if path is not None and os.path.exists(path):
        return
    if spec.hub_url or spec.script_url or spec.cloud_file_name:
        raise _hub_error(spec)
    raise UserError(
        f"{path}: not found ({spec.describe()}, \"file_name\": \"{spec.file_name}\", looked up "
        f'relative to dataset_dir "{dataset_dir}"). Put the file there or fix "file_name".'
    )


def _path_spec(name: str, dataset_dir: str) -> DatasetSpec | None:
    """A spec for a dataset named by its path, or None when no such file or folder exists."""
    # Relative to dataset_dir first (like file_name), then as given, from the working directory.
    joined = os.path.join(dataset_dir, name)
    if os.path.exists(joined):
        return DatasetSpec(name=name, file_name=name)
    if os.path.exists(name):
        return DatasetSpec(name=name, file_name=os.path.abspath(name))
    return None


def resolve_datasets(dataset_dir: str, names: list[str]) -> list[DatasetSpec]:
    """The specs of the datasets named in `dataset: a,b`, in order, checked for trainability.

    Each name is an entry of `dataset_dir/dataset_info.json` or, failing that, the path of a data
    file or folder. Raises UserError for unknown names (with the closest entry), a missing or
    invalid `dataset_info.json`, hub-only data, missing files, pairwise or multimodal data.
    """
    names = [name.strip() for name in names if name and name.strip()]
    if not names:
        raise UserError("dataset: no dataset named. Set `dataset: name1,name2` in the config.")
    if dataset_dir == "ONLINE" or dataset_dir.startswith("REMOTE:"):
        raise UserError(
            f'dataset_dir: "{dataset_dir}" means fetching data from a hub, which this machine '
            f"cannot reach: download the data and set dataset_dir to a local folder."
        )

    info_path = os.path.join(dataset_dir, DATA_CONFIG)
    raw_info: dict | None = _read_info(info_path) if os.path.isfile(info_path) else None

    specs = []
    for name in names:
        if raw_info is not None and name in raw_info:
            spec = parse_entry(name, raw_info[name], info_path)
        else:
            spec = _path_spec(name, dataset_dir)
            if spec is None:
                if raw_info is None:
                    raise UserError(
                        f'{info_path}: not found, and dataset "{name}" is not an existing file or '
                        f"folder either. Set dataset_dir to the folder that holds {DATA_CONFIG}, "
                        f"or give the path of a data file."
                    )
                raise UserError(
                    f'dataset "{name}" is not in {info_path}{_closest(name, raw_info)}, and no '
                    f"file or folder {os.path.join(dataset_dir, name)} exists. Add an entry to "
                    f"{DATA_CONFIG} or give the path of a data file."
                )
        check_trainable(spec, dataset_dir)
        specs.append(spec)
    return specs
