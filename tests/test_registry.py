"""dataset_info.json parsing and dataset selection (prospect.data.registry)."""

from __future__ import annotations

import json
import os

import pytest

from prospect.data.registry import DatasetSpec, load_registry, parse_entry, resolve_datasets
from prospect.errors import UserError

# ../shared/data holds the reference demo datasets; PROSPECT_SHARED_DIR overrides.
SHARED_DATA = os.path.normpath(os.path.join(
    os.environ.get("PROSPECT_SHARED_DIR",
                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")),
    "data"))
needs_shared = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED_DATA, "dataset_info.json")),
    reason="reference data (../shared/data) not present",
)


def write_info(folder, entries: dict) -> str:
    """Write `entries` as folder/dataset_info.json and return the folder as a string."""
    (folder / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")
    return str(folder)


# ----------------------------------------------------------------------------------------------
# The reference dataset_info.json


@needs_shared
def test_all_reference_entries_parse():
    with open(os.path.join(SHARED_DATA, "dataset_info.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    registry = load_registry(SHARED_DATA)
    assert len(raw) == 104
    assert list(registry) == list(raw)
    assert all(isinstance(spec, DatasetSpec) for spec in registry.values())

    kto = registry["kto_en_demo"]
    assert kto.file_name == "kto_en_demo.json"
    assert kto.formatting == "sharegpt"
    assert kto.columns == {"messages": "messages", "kto_tag": "label"}
    assert kto.tags["role_tag"] == "role" and kto.tags["assistant_tag"] == "assistant"
    assert registry["dpo_en_demo"].ranking is True
    assert registry["alpaca_en_demo"].formatting is None
    assert registry["alpaca_en_demo"].has_columns is False
    assert registry["ultrachat_200k"].split == "train_sft"
    assert registry["starcoder_python"].folder == "python"
    assert registry["llava_1k_en"].subset == "en"
    assert registry["alpaca_en"].hf_hub_url == "llamafactory/alpaca_en"
    assert registry["alpaca_en"].om_hub_url == "HaM/alpaca_en"
    assert registry["deepctrl"].ms_hub_url == "deepctrl/deepctrl-sft-data"
    assert registry["deepctrl"].file_name is None


@needs_shared
def test_selecting_a_hub_entry_says_it_cannot_be_reached(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError) as caught:
        resolve_datasets(SHARED_DATA, ["alpaca_en"])
    message = str(caught.value)
    assert "dataset alpaca_en lives on the Hugging Face hub (llamafactory/alpaca_en)" in message
    assert "which this machine cannot reach" in message
    assert "point `file_name` at the local copy" in message
    assert "dataset_info.json" in message


@needs_shared
def test_hub_error_mentions_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE is set"):
        resolve_datasets(SHARED_DATA, ["ultrachat_200k"])


@needs_shared
def test_modelscope_only_entry_names_modelscope():
    with pytest.raises(UserError, match=r"ModelScope hub \(deepctrl/deepctrl-sft-data\)"):
        resolve_datasets(SHARED_DATA, ["deepctrl"])


@needs_shared
def test_unknown_name_suggests_the_closest_entry():
    with pytest.raises(UserError) as caught:
        resolve_datasets(SHARED_DATA, ["kto_en_dmeo"])
    message = str(caught.value)
    assert 'dataset "kto_en_dmeo" is not in' in message
    assert 'did you mean "kto_en_demo"?' in message
    assert os.path.join(SHARED_DATA, "dataset_info.json") in message


@needs_shared
def test_ranking_entry_is_rejected_as_pairwise_data():
    with pytest.raises(UserError) as caught:
        resolve_datasets(SHARED_DATA, ["dpo_en_demo"])
    message = str(caught.value)
    assert "dpo_en_demo" in message
    assert "prospect trains sft and kto" in message
    assert "pairwise data is not supported" in message


@needs_shared
def test_multimodal_entry_is_rejected():
    with pytest.raises(UserError, match=r'"mllm_demo".*columns.images.*text-only'):
        resolve_datasets(SHARED_DATA, ["mllm_demo"])


@needs_shared
def test_selected_entry_whose_file_is_missing_names_the_path():
    with pytest.raises(UserError) as caught:
        resolve_datasets(SHARED_DATA, ["alpaca_zh_demo"])
    message = str(caught.value)
    assert message.startswith(os.path.join(SHARED_DATA, "alpaca_zh_demo.json") + ": not found")
    assert '"file_name": "alpaca_zh_demo.json"' in message


@needs_shared
def test_resolve_keeps_order_and_accepts_spaces():
    specs = resolve_datasets(SHARED_DATA, [" kto_en_demo", "identity ", ""])
    assert [spec.name for spec in specs] == ["kto_en_demo", "identity"]
    assert specs[1].data_path(SHARED_DATA) == os.path.join(SHARED_DATA, "identity.json")


# ----------------------------------------------------------------------------------------------
# Entry validation


def test_known_llamafactory_keys_are_accepted(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    entry = {
        "file_name": "d.json", "formatting": "sharegpt", "ranking": False, "subset": "en",
        "split": "train", "folder": "x", "num_samples": 10, "load_from": "file",
        "script_url": "s", "cloud_file_name": "c", "revision": "main", "file_sha1": "abc",
        "columns": {"messages": "m", "system": "s", "tools": "t", "kto_tag": "k",
                    "images": "i", "videos": "v", "audios": "a", "chosen": "c", "rejected": "r",
                    "prompt": "p", "query": "q", "response": "o", "history": "h"},
        "tags": {"role_tag": "r", "content_tag": "c", "user_tag": "u", "assistant_tag": "a",
                 "observation_tag": "o", "function_tag": "f", "system_tag": "s"},
    }
    spec = parse_entry("full", entry, "info.json")
    assert spec.num_samples == 10 and spec.subset == "en" and spec.script_url == "s"
    assert spec.columns["kto_tag"] == "k" and spec.tags["function_tag"] == "f"


def test_unknown_entry_key_names_entry_key_and_suggestion(tmp_path):
    folder = write_info(tmp_path, {"mine": {"file_name": "d.json", "colums": {}}})
    with pytest.raises(UserError) as caught:
        load_registry(folder)
    message = str(caught.value)
    assert 'dataset "mine": unknown key "colums" (did you mean "columns"?)' in message
    assert "dataset_info.json" in message


def test_unknown_column_and_tag_keys_are_errors():
    with pytest.raises(UserError, match=r'"columns.label": unknown column'):
        parse_entry("x", {"file_name": "a.json", "columns": {"label": "label"}}, "info.json")
    with pytest.raises(UserError, match=r'"tags.user": unknown tag \(did you mean "user_tag"\?\)'):
        parse_entry("x", {"file_name": "a.json", "tags": {"user": "human"}}, "info.json")


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"file_name": "a.json", "formatting": "chatml"}, r'"formatting": unknown value "chatml"'),
        ({"file_name": "a.json", "ranking": "yes"}, r'"ranking": expected true or false'),
        ({"file_name": 3}, r'"file_name": expected a non-empty string, got a number'),
        ({"file_name": "a.json", "num_samples": 0}, r'"num_samples": expected a positive'),
        ({"file_name": "a.json", "columns": ["messages"]}, r'"columns": expected an object'),
        ({"file_name": "a.json", "columns": {"messages": 1}}, r'"columns.messages": expected'),
        ({"formatting": "sharegpt"}, r"says nowhere where the data is"),
        ("a.json", r"expected an object"),
    ],
)
def test_bad_entry_values(entry, expected):
    with pytest.raises(UserError, match=expected) as caught:
        parse_entry("bad", entry, "data/dataset_info.json")
    assert str(caught.value).startswith('data/dataset_info.json: dataset "bad"')


def test_only_selected_entries_are_checked(tmp_path):
    (tmp_path / "good.json").write_text("[]")
    folder = write_info(tmp_path, {"good": {"file_name": "good.json"},
                                   "broken": {"file_name": "x.json", "weird": 1}})
    assert [spec.name for spec in resolve_datasets(folder, ["good"])] == ["good"]
    with pytest.raises(UserError, match=r'unknown key "weird"'):
        resolve_datasets(folder, ["broken"])


def test_invalid_dataset_info_json_gives_line_and_column(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "a.json",}\n}')
    with pytest.raises(UserError) as caught:
        resolve_datasets(str(tmp_path), ["a"])
    assert "dataset_info.json: invalid JSON at line 2, column" in str(caught.value)


def test_missing_dataset_info_for_a_registry_name(tmp_path):
    with pytest.raises(UserError) as caught:
        resolve_datasets(str(tmp_path), ["alpaca_en_demo"])
    message = str(caught.value)
    assert os.path.join(str(tmp_path), "dataset_info.json") + ": not found" in message
    assert '"alpaca_en_demo"' in message


def test_hub_entry_with_a_local_file_reads_the_file(tmp_path):
    (tmp_path / "local.json").write_text("[]")
    folder = write_info(tmp_path, {"both": {"hf_hub_url": "org/data", "file_name": "local.json"},
                                   "gone": {"hf_hub_url": "org/data", "file_name": "gone.json"}})
    [spec] = resolve_datasets(folder, ["both"])
    assert spec.data_path(folder) == os.path.join(folder, "local.json")
    with pytest.raises(UserError, match=r"Hugging Face hub \(org/data\).*gone.json"):
        resolve_datasets(folder, ["gone"])


def test_script_and_cloud_entries_are_rejected_when_selected(tmp_path):
    folder = write_info(tmp_path, {"script": {"script_url": "my_script"},
                                   "cloud": {"cloud_file_name": "s3://bucket/data.json"}})
    with pytest.raises(UserError, match=r'"script_url".*not supported'):
        resolve_datasets(folder, ["script"])
    with pytest.raises(UserError, match=r"s3://bucket/data.json.*cannot be fetched"):
        resolve_datasets(folder, ["cloud"])


def test_online_dataset_dir_is_rejected():
    with pytest.raises(UserError, match=r'dataset_dir: "ONLINE"'):
        resolve_datasets("ONLINE", ["org/data"])


# ----------------------------------------------------------------------------------------------
# Datasets named by path


def test_path_relative_to_dataset_dir_without_dataset_info(tmp_path):
    (tmp_path / "mine.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    [spec] = resolve_datasets(str(tmp_path), ["mine.jsonl"])
    assert spec.name == "mine.jsonl"
    assert spec.info_path is None and spec.formatting is None
    assert spec.data_path(str(tmp_path)) == os.path.join(str(tmp_path), "mine.jsonl")


def test_absolute_path_and_folder_and_cwd_relative_path(tmp_path, monkeypatch):
    data = tmp_path / "elsewhere"
    data.mkdir()
    (data / "part.jsonl").write_text("{}\n")
    dataset_dir = tmp_path / "registry"
    dataset_dir.mkdir()
    folder = write_info(dataset_dir, {"x": {"file_name": "x.json"}})

    [absolute] = resolve_datasets(folder, [str(data / "part.jsonl")])
    assert absolute.data_path(folder) == str(data / "part.jsonl")
    [as_folder] = resolve_datasets(folder, [str(data)])
    assert os.path.isdir(as_folder.data_path(folder))

    monkeypatch.chdir(tmp_path)
    [relative] = resolve_datasets(folder, ["elsewhere/part.jsonl"])
    assert relative.data_path(folder) == str(data / "part.jsonl")
