"""From config to encoded, split datasets: records → examples → token ids and labels (cached).

This is the data half of the run's straight line (prospect/train.py's docstring draws it). Each dataset of `dataset: a,b` is
read and validated (`formats`), cut to `max_samples`, encoded with the template (`encode`) in
`preprocessing_num_workers` processes, and cached on disk keyed by everything that changes the
tokens, so a second run (or `prospect train` after `prospect data check`) skips tokenization.
Datasets are then concatenated and `val_size` is split off with `seed` (whole conversations, when
they rate several turns).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from prospect.config import RunConfig
from prospect.data.encode import DroppedExample, EncodedExample, encode_example
from prospect.data.example import Example, conversation_of, fold_conversations
from prospect.data.formats import load_examples
from prospect.data.registry import DatasetSpec, resolve_datasets
from prospect.data.templates import get_template
from prospect.errors import UserError
from prospect.model import cache_root

# Bump when the encoded columns or the encoding rules change, so old caches are not reused.
CACHE_VERSION = 4  # 3: KTO examples are rated turns (Example.rated_turns); 4: records folded into conversations


@dataclass
class DatasetReport:
    """What happened to one dataset on its way to training (printed by `prospect data check`)."""

    name: str
    split: str  # "train" or "eval"
    num_records: int = 0
    skipped: list = field(default_factory=list)  # (origin, reason) of bad records, on_bad_record: skip
    num_over_max_samples: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    num_kept: int = 0
    num_desirable: int = 0
    num_undesirable: int = 0
    token_lengths: list[int] = field(default_factory=list)  # kept examples, before cutoff_len
    num_truncated: int = 0
    num_prompts_cut: int = 0  # KTO: truncation removed prompt tokens (earlier turns) ...
    num_completions_cut: int = 0  # ... or the end of the completion
    num_trained_tokens: int = 0
    rated_turns: dict[str, int] = field(default_factory=dict)  # KTO: rated turns per record -> records
    num_folded: int = 0  # KTO: records that rate a turn of another record's conversation, trained as its turn


@dataclass
class PreparedData:
    train: "datasets.Dataset"  # noqa: F821  (columns: input_ids, labels, prompt_len, label, origin, ...)
    eval: "datasets.Dataset | None"  # noqa: F821
    reports: list[DatasetReport]
    template_name: str


def prepare_data(config: RunConfig, tokenizer) -> PreparedData:
    """Read, validate, encode (cached), mix and split the config's datasets."""
    template = get_template(config.template, tokenizer, config.default_system)
    template_name = config.template or "auto"
    train_parts, reports = _encode_all(config, config.dataset, "train", template, tokenizer)
    import datasets

    train = datasets.concatenate_datasets(train_parts) if len(train_parts) > 1 else train_parts[0]
    eval_set = None
    if config.eval_dataset:
        eval_parts, eval_reports = _encode_all(config, config.eval_dataset, "eval", template, tokenizer)
        eval_set = datasets.concatenate_datasets(eval_parts) if len(eval_parts) > 1 else eval_parts[0]
        reports += eval_reports
    elif config.val_size > 0:
        num_eval = int(config.val_size) if config.val_size >= 1 else max(1, round(config.val_size * len(train)))
        if num_eval >= len(train):
            raise UserError(
                f"val_size: {config.val_size} leaves no training examples ({len(train)} in all): use a smaller value."
            )
        train, eval_set = _split_off(train, num_eval, config.seed)
    if len(train) == 0:
        raise UserError(
            "no training example is left after validation and cutoff_len "
            f"(datasets: {', '.join(config.dataset)}): run `prospect data check` to see why."
        )
    return PreparedData(train=train, eval=eval_set, reports=reports, template_name=template_name)


def _split_off(train, num_eval: int, seed: int):
    """(train, eval) with about `num_eval` examples held out at random. The rated turns of one
    conversation (origins "file#i turn k") stay on one side: a turn held out whose conversation's
    earlier turns were trained on would be judged on data the model has seen."""
    conversations = [conversation_of(origin) for origin in train["origin"]]
    if len(set(conversations)) == len(conversations):
        split = train.train_test_split(test_size=num_eval, seed=seed, shuffle=True)
        return split["train"], split["test"]
    import random

    order = list(dict.fromkeys(conversations))
    random.Random(seed).shuffle(order)
    size: dict[str, int] = {}
    for name in conversations:
        size[name] = size.get(name, 0) + 1
    held_out, num_held_out = set(), 0
    for name in order:
        if num_held_out >= num_eval:
            break
        held_out.add(name)
        num_held_out += size[name]
    eval_rows = [i for i, name in enumerate(conversations) if name in held_out]
    train_rows = [i for i, name in enumerate(conversations) if name not in held_out]
    return train.select(train_rows), train.select(eval_rows)


def _encode_all(config, names, split, template, tokenizer):
    specs = resolve_datasets(config.dataset_dir, names)
    parts, reports = [], []
    for spec in specs:
        encoded, report = _encode_dataset(config, spec, split, template, tokenizer)
        parts.append(_kept(encoded))
        reports.append(report)
    return parts, reports


def _encode_dataset(config: RunConfig, spec: DatasetSpec, split: str, template, tokenizer):
    """Encode one dataset, from the cache when nothing that shapes its tokens has changed."""
    import datasets

    key = _cache_key(config, spec, template, tokenizer)
    folder = cache_root(config.cache_dir) / "tokenized" / f"{_safe(spec.name)}-{key}"
    report_file = folder / "report.json"
    if not config.overwrite_cache and folder.is_dir() and report_file.is_file():
        report = DatasetReport(**json.loads(report_file.read_text()))
        report.split = split
        return datasets.load_from_disk(str(folder / "dataset")), report

    examples, skipped = load_examples(spec, config.dataset_dir, stage=config.stage, on_bad_record=config.on_bad_record)
    report = DatasetReport(name=spec.name, split=split, num_records=len(examples) + len(skipped))
    report.skipped = [list(s) if isinstance(s, tuple) else [s.origin, s.reason] for s in skipped]
    if config.max_samples is not None and len(examples) > config.max_samples:
        report.num_over_max_samples = len(examples) - config.max_samples
        examples = examples[: config.max_samples]
    if not examples:
        raise UserError(f"{spec.describe()}: no usable record (after on_bad_record and max_samples).")
    if config.stage == "kto":  # one example per rated turn (most records rate their last turn only)
        examples, report.num_folded = fold_conversations(examples)
        per_record = [example.rated_turns() for example in examples]
        for turns in per_record:
            report.rated_turns[str(len(turns))] = report.rated_turns.get(str(len(turns)), 0) + 1
        examples = [turn for turns in per_record for turn in turns]

    source = datasets.Dataset.from_dict({"example": [e.to_json() for e in examples]})
    num_proc = config.preprocessing_num_workers if (config.preprocessing_num_workers or 1) > 1 else None
    if num_proc:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
        num_proc = min(num_proc, len(examples))
    encoded = source.map(
        _encode_batch,
        batched=True,
        batch_size=256,
        remove_columns=["example"],
        num_proc=num_proc,
        fn_kwargs={
            "template": template,
            "tokenizer": tokenizer,
            "stage": config.stage,
            "cutoff_len": config.cutoff_len,
            "train_on_prompt": config.train_on_prompt,
            "mask_history": config.mask_history,
            "truncation_mode": config.truncation_mode,
        },
        new_fingerprint=key,  # hashing the tokenizer for datasets' own fingerprint is slow and unneeded
        desc=f"Tokenizing {spec.name}",
    )
    errors = [e for e in encoded["error"] if e]
    if errors:
        raise UserError(errors[0])
    encoded = encoded.remove_columns(["error"])
    _fill_report(report, encoded, config.cutoff_len)
    _save_atomically(folder, encoded, report)
    return encoded, report


# Columns of an encoded dataset. Besides the tokens, the per-example numbers the training loop needs are
# written here, once, so the loop reads them through the dataset's own indexing (a split or a selection
# of kept rows is an index mapping over the stored table: only indexing honours it).
ENCODED_COLUMNS = ("input_ids", "labels", "prompt_len", "label", "num_tokens", "num_trained_targets",
                   "num_tokens_before_cutoff", "prompt_tokens_cut", "completion_tokens_cut", "origin", "dropped",
                   "error")


def _encode_batch(batch, *, template, tokenizer, stage, cutoff_len, train_on_prompt, mask_history, truncation_mode):
    """`datasets.map` worker: encode a batch of examples; record errors instead of raising them,
    because an exception inside a worker process would lose its message."""
    out = {k: [] for k in ENCODED_COLUMNS}
    for text in batch["example"]:
        example = Example.from_json(text)
        try:
            result = encode_example(
                example, template, tokenizer, stage=stage, cutoff_len=cutoff_len,
                train_on_prompt=train_on_prompt, mask_history=mask_history, truncation_mode=truncation_mode,
            )
            error = ""
        except UserError as err:
            result, error = None, str(err)
        kept = isinstance(result, EncodedExample)
        out["input_ids"].append(result.input_ids if kept else [])
        out["labels"].append(result.labels if kept else [])
        out["prompt_len"].append(result.prompt_len if kept else 0)
        out["num_tokens"].append(len(result.input_ids) if kept else 0)
        out["num_trained_targets"].append(result.num_trained_targets if kept else 0)
        out["num_tokens_before_cutoff"].append(result.num_tokens_before_cutoff if result is not None else 0)
        out["prompt_tokens_cut"].append(result.prompt_tokens_cut if kept else 0)
        out["completion_tokens_cut"].append(result.completion_tokens_cut if kept else 0)
        out["dropped"].append(result.reason.value if isinstance(result, DroppedExample) else "")
        out["label"].append(example.label)
        out["origin"].append(example.origin)
        out["error"].append(error)
    return out


def _fill_report(report: DatasetReport, encoded, cutoff_len: int) -> None:
    dropped = Counter(reason for reason in encoded["dropped"] if reason)
    report.dropped = dict(dropped)
    kept = _kept(encoded)
    report.num_kept = len(kept)
    labels = kept["label"]
    report.num_desirable = sum(1 for label in labels if label is True)
    report.num_undesirable = sum(1 for label in labels if label is False)
    report.token_lengths = list(kept["num_tokens_before_cutoff"])
    report.num_truncated = sum(1 for n in report.token_lengths if n > cutoff_len)
    report.num_prompts_cut = sum(1 for n in kept["prompt_tokens_cut"] if n > 0)
    report.num_completions_cut = sum(1 for n in kept["completion_tokens_cut"] if n > 0)
    report.num_trained_tokens = sum(sum(1 for t in row if t != -100) for row in kept["labels"])


def _kept(encoded):
    """The rows that were not dropped (dropped rows stay in the cache only for the report)."""
    return encoded.select([i for i, reason in enumerate(encoded["dropped"]) if not reason])


def _save_atomically(folder: Path, encoded, report: DatasetReport) -> None:
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    was_enabled = is_progress_bar_enabled()
    try:
        disable_progress_bar()  # saving a few MB is instant; its bar would only be noise
        encoded.save_to_disk(str(tmp / "dataset"))
        (tmp / "report.json").write_text(json.dumps(report.__dict__))
        if folder.exists():
            shutil.rmtree(folder)  # overwrite_cache: replace the old copy
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if was_enabled:
            enable_progress_bar()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(name))[:40]


def _cache_key(config: RunConfig, spec: DatasetSpec, template, tokenizer) -> str:
    """A hash of everything that changes the encoded tokens of this dataset."""
    h = hashlib.sha256()
    parts = {
        "version": CACHE_VERSION,
        "spec": spec.__dict__,
        "files": _file_fingerprints(spec.data_path(config.dataset_dir)),
        "template": config.template or "auto",
        "template_repr": repr(template),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "default_system": config.default_system,
        "special_tokens": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
        "stage": config.stage,
        "cutoff_len": config.cutoff_len,
        "max_samples": config.max_samples,
        "train_on_prompt": config.train_on_prompt,
        "mask_history": config.mask_history,
        "truncation_mode": config.truncation_mode,
        "on_bad_record": config.on_bad_record,
    }
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _file_fingerprints(path: str | None) -> list:
    if path is None or not os.path.exists(path):
        return []
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names
    )
    return [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
