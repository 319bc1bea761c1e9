"""Inference shared by `prospect chat`, `prospect serve` and `prospect eval`.

What lives here:

- **Loading** (`load_inference_model`): the base model, the LoRA adapters of
  `adapter_name_or_path` (a comma list; `name=path` entries name them, otherwise the folder's name
  is used), the tokenizer, and the chat template *the adapter was trained with*: when an adapter
  folder holds `run_config.yaml` (written by `prospect train`), its `template` and `default_system`
  are used unless the config sets `template` itself.
- **Generation** (`generate_batch`): one call of `model.generate` for several prompts, left padded,
  greedy when `temperature == 0`, each row stopping at the template's end-of-turn token, the
  tokenizer's eos token, a stop string or its own token budget. New text is handed to a callback
  as it is produced (streaming), with an incomplete UTF-8 character or a possible beginning of a
  stop string held back until it is complete. With several adapters loaded, each row can use its
  own adapter (PEFT's mixed-adapter batches; `BASE_MODEL` = adapters off).
- **Replies** (`generate_replies`): conversations in, reply texts out, batched — what `eval` needs.

Heavy libraries (torch, transformers, peft) are imported inside functions: importing this is cheap.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prospect.config import adapter_paths
from prospect.data.example import Message
from prospect.errors import UserError

# PEFT's name for "no adapter" in a mixed-adapter batch.
BASE_MODEL = "__base__"


# --------------------------------------------------------------------------------------------------
# Adapters and the run they came from


@dataclass(frozen=True)
class AdapterSpec:
    """One entry of `adapter_name_or_path`."""

    name: str  # what users call it (the server's `model` field)
    path: str
    key: str  # the name inside PEFT (module names cannot hold dots or slashes, user names can)


def parse_adapters(value: str | None) -> list[AdapterSpec]:
    """`adapter_name_or_path` as a list: "a,b" or "name=path,other=path2" (names default to the folder name)."""
    specs: list[AdapterSpec] = []
    for index, item in enumerate(part.strip() for part in (value or "").split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/\\")).name, item
        name, path = name.strip(), path.strip()
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise UserError(
                f"adapter_name_or_path: {path} has no adapter_config.json; point it at a folder written by "
                "`prospect train` (or PEFT's save_pretrained)."
            )
        if not name or name == BASE_MODEL or name in {s.name for s in specs}:
            raise UserError(
                f"adapter_name_or_path: the adapter name {name!r} ({path}) is empty, reserved or used twice; "
                "name the adapters explicitly, e.g. `adapter_name_or_path: kto=saves/kto,sft=saves/sft`."
            )
        specs.append(AdapterSpec(name=name, path=path, key=f"adapter_{index}"))
    return specs


def read_run_config(folder: str | os.PathLike | None) -> dict[str, Any]:
    """The `run_config.yaml` that `prospect train` writes next to an adapter, or {} when there is none."""
    if not folder:
        return {}
    path = Path(folder) / "run_config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err}); fix or delete it.") from None
    return data if isinstance(data, dict) else {}


def trained_on(adapter_path: str) -> list[str]:
    """The adapters a run merged into its base before training `adapter_path` further: all but the last
    of its run's `adapter_name_or_path` (prospect train merges those and continues the last one). Its
    KTO reference was that base, so evaluating it against the plain base model would be wrong."""
    merged = adapter_paths(read_run_config(adapter_path).get("adapter_name_or_path"))[:-1]
    for path in merged:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise UserError(
                f"{adapter_path}/run_config.yaml says this adapter was trained on a base with {path} merged in, but "
                f"{path} has no adapter_config.json (run from the folder training ran in, or fix the path there)."
            )
    return merged


def resolve_template(config, tokenizer, adapter_path: str | None = None):
    """The chat template to talk to a model with: the config's `template` when it sets one, else
    the one the adapter was trained with (its run_config.yaml), else the tokenizer's own."""
    from prospect.data.templates import get_template

    name, system = config.template, config.default_system
    if name is None:
        run = read_run_config(adapter_path)
        name = run.get("template")
        if system is None:
            system = run.get("default_system")
    return get_template(name, tokenizer, system)


def base_model_name(config) -> str:
    """What the server calls the base model: the model folder's (or file's) name."""
    name = Path(str(config.model_name_or_path).rstrip("/\\")).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _same_model(a: str, b: str) -> bool:
    """Whether two model_name_or_path values name the same model (paths compared resolved)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.strip().lower() == b.strip().lower()


def warn_on_base_mismatch(config, adapters: Sequence[AdapterSpec]) -> None:
    """An adapter trained on another base model may load without error and then talk nonsense; say so."""
    for spec in adapters:
        run = read_run_config(spec.path)
        trained_on = run.get("model_name_or_path")
        if trained_on and not _same_model(str(trained_on), str(config.model_name_or_path)):
            print(
                f"warning: adapter {spec.path} was trained on {trained_on}, not on {config.model_name_or_path} "
                "(model_name_or_path); its replies may be garbage.",
                file=sys.stderr,
            )


# --------------------------------------------------------------------------------------------------
# Loading


def inference_device_and_dtype(config):
    """(device, dtype) for inference: float32 on CPU (bf16 matmuls are slow there); bf16 on a GPU
    that supports it, else fp16 — unless `infer_dtype` says otherwise."""
    import torch

    if torch.cuda.is_available():
        device = "cuda"
        auto = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        device, auto = "cpu", torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return device, names.get(config.infer_dtype, auto)


def load_tokenizer_for(config, adapters: Sequence[AdapterSpec]):
    """The tokenizer saved with the (last) adapter, if it has one, else the base model's."""
    from prospect.model import load_tokenizer

    source = config.model_name_or_path
    if adapters and os.path.isfile(os.path.join(adapters[-1].path, "tokenizer_config.json")):
        source = adapters[-1].path
    return load_tokenizer(source, trust_remote_code=config.trust_remote_code, cache_dir=config.cache_dir)


def attach_adapters(model, adapters: Sequence[AdapterSpec]):
    """Load every adapter into one PeftModel, all of them active (their LoRA updates add up)."""
    from peft import PeftModel

    first, *rest = adapters
    try:
        model = PeftModel.from_pretrained(model, first.path, adapter_name=first.key)
        for spec in rest:
            model.load_adapter(spec.path, adapter_name=spec.key)
    except (ValueError, KeyError, RuntimeError) as err:  # e.g. an adapter made for another architecture
        raise UserError(
            f"adapter_name_or_path: cannot load the adapters onto {model.config._name_or_path or 'the base model'} "
            f"({type(err).__name__}: {err}); check that model_name_or_path is the model they were trained on."
        ) from None
    model.base_model.set_adapter([spec.key for spec in adapters], inference_mode=True)
    return model


def load_inference_model(config, *, merge: bool = False, merged_first: Sequence[str] = (), device=None, dtype=None,
                         quantize: bool = True):
    """(model, tokenizer, template) for chat, serve, eval and export: the one place a model is loaded
    for anything but training.

    The model is the base model with every adapter of `adapter_name_or_path` applied (a PeftModel;
    with `merge=True` the adapters are merged into the weights instead, which makes generation a
    little faster but leaves no way to switch them off). `merged_first` are adapter folders merged
    into the base weights before that (the base a chained run trained on, see `trained_on`). The
    template is the one the (last) adapter was trained with, see `resolve_template`. `device` and
    `dtype` default to `inference_device_and_dtype` (export asks for float32 on the CPU). With
    `quantization_bit` the base is loaded quantized, as it was trained, unless `quantize=False`
    (export merges into the full-precision base).
    """
    from prospect.model import load_model, merge_adapters, quantization_config

    adapters = parse_adapters(config.adapter_name_or_path)
    warn_on_base_mismatch(config, adapters)
    tokenizer = load_tokenizer_for(config, adapters)
    default_device, default_dtype = inference_device_and_dtype(config)
    device, dtype = device or default_device, dtype or default_dtype
    quantization = quantization_config(config, compute_dtype=dtype) if quantize else None
    base = load_model(config.model_name_or_path, dtype=dtype, trust_remote_code=config.trust_remote_code,
                      cache_dir=config.cache_dir, quantization=quantization, device=device)
    model = merge_adapters(base, list(merged_first))
    if adapters:
        model = attach_adapters(model, adapters)
        if merge and quantization is None:  # merged into 4/8-bit weights, the update would be rounded away
            model = model.merge_and_unload()
    (model if quantization is not None else model.to(device)).eval()  # a quantized model is on its device already
    template = resolve_template(config, tokenizer, adapters[-1].path if adapters else None)
    return model, tokenizer, template


def context_length(model, tokenizer=None) -> int | None:
    """Most tokens (prompt + reply) the model can attend to, or None when unknown."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


def stop_token_ids(tokenizer, template, model=None) -> list[int]:
    """Tokens that end a reply: the template's end-of-turn, the tokenizer's eos, the model's eos ids."""
    ids: list[int] = []
    end_of_turn = getattr(template, "end_of_turn", None)
    if end_of_turn:
        encoded = tokenizer.encode(end_of_turn, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(encoded[0])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    ids.extend([eos] if isinstance(eos, int) else list(eos or []))
    return list(dict.fromkeys(ids))


# --------------------------------------------------------------------------------------------------
# Prompts


def render_prompt(template, messages: Sequence[Message], tools: Sequence[dict] | None = None) -> str:
    """The text the model sees before it writes the next assistant turn."""
    return template.render(messages, tools or (), add_generation_prompt=True).text


def encode_prompt(tokenizer, text: str) -> list[int]:
    # The template already wrote every special token (bos included), so the tokenizer adds none.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generated:
    """One row's result."""

    text: str
    token_ids: list[int]  # the reply's tokens, without the stop token
    finish_reason: str  # "stop" (end of turn or stop string), "length" (token budget) or "cancelled"
    num_tokens: int  # tokens the model produced, stop token included (what usage counts)


class _RowState:
    """Decodes one row's tokens into text as they come, and decides when the row is done.

    Decoding the whole reply again at each token is simple and always right for byte-level BPE
    (a character may span several tokens); replies are short enough for it to cost nothing.
    """

    def __init__(self, tokenizer, max_new_tokens: int, stop_ids: set[int], stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.stop_strings = [s for s in stop_strings if s]
        self.token_ids: list[int] = []
        self.num_tokens = 0
        self.text = ""
        self.emitted = 0  # characters of `text` already handed to the callback
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int) -> str:
        """Take the row's next token; return the new text that is safe to show."""
        self.num_tokens += 1
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self.flush()
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(
            self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        for stop in self.stop_strings:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at >= 0:
                self.text = self.text[:at]
                self.finish_reason = "stop"
        if not self.done and len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.flush() if self.done else self._take(self._safe_end())

    def _safe_end(self) -> int:
        """End of the text that can be shown now: no trailing half character, no possible stop-string start."""
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == "\ufffd":
            end -= 1
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, end - self.emitted), 0, -1):
                if self.text.endswith(stop[:size], 0, end):
                    end -= size
                    break
        return end

    def _take(self, end: int) -> str:
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece

    def flush(self) -> str:
        return self._take(len(self.text))


def _stopping_criteria(rows: list[_RowState], on_text, is_cancelled):
    """A transformers StoppingCriteria that feeds each new token to its row and reports done rows.

    Running the bookkeeping here (rather than in a streamer) means a row that hits its token
    budget or a stop string is finished in the same step, and generation ends as soon as every
    row is done — or every caller has gone away.
    """
    import torch
    from transformers import StoppingCriteria

    class RowsDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            new_tokens = input_ids[:, -1].tolist()  # called once per step, after the step's token is appended
            for index, row in enumerate(rows):
                if row.done:
                    continue
                if is_cancelled is not None and is_cancelled(index):
                    row.finish_reason = "cancelled"
                    continue
                piece = row.add(new_tokens[index])
                if piece and on_text is not None:
                    on_text(index, piece)
            return torch.tensor([row.done for row in rows], dtype=torch.bool, device=input_ids.device)

    return RowsDone()


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] | Sequence[Sequence[str]] = (),
    adapter_names: Sequence[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    is_cancelled: Callable[[int], bool] | None = None,
) -> list[Generated]:
    """Generate a reply for each prompt (token ids) in one batched `model.generate` call.

    Prompts are left padded, so every row's next token sits in the last column. Greedy when
    `temperature == 0`, else sampling with `temperature` and `top_p` (top-k and repetition
    penalties from the model's generation_config are switched off: callers get what they asked
    for). `max_new_tokens` and `stop_strings` may be given per row; `adapter_names` (per row, a
    PEFT adapter name or BASE_MODEL) selects adapters in a PeftModel. `on_text(row, text)` receives
    each row's new text as it is produced; `is_cancelled(row)` lets a caller drop a row.
    """
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    count = len(prompts)
    if count == 0:
        return []
    budgets = [max_new_tokens] * count if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if stop_strings and isinstance(stop_strings[0], str):
        row_stops = [list(stop_strings)] * count
    else:
        row_stops = [list(s) for s in stop_strings] or [[] for _ in range(count)]
    if not stop_ids:  # the caller named none: the model's own eos ids, so that rows still end
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    stop_set = set(stop_ids)
    rows = [_RowState(tokenizer, budget, stop_set, stops) for budget, stops in zip(budgets, row_stops)]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(stop_ids) or [0])[0]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError("generate_batch: empty prompt")
        input_ids[index, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[index, width - len(prompt) :] = 1

    # Sampling settings are only set when sampling: greedy decoding ignores them (and transformers
    # warns about any that are set). top-k and the repetition penalty are switched off, whatever
    # the model's generation_config.json says, so that callers get exactly what they asked for.
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {}
    generation_config = GenerationConfig(
        max_new_tokens=max(budgets),
        do_sample=temperature > 0,
        repetition_penalty=1.0,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=pad_id,
        **sampling,
    )
    kwargs: dict[str, Any] = {}
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
    criteria = StoppingCriteriaList([_stopping_criteria(rows, on_text, is_cancelled)])
    with torch.inference_mode():
        model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            stopping_criteria=criteria,
            **kwargs,
        )
    results = []
    for index, row in enumerate(rows):
        if not row.done:  # generate stopped on its own (e.g. the model's maximum length)
            row.finish_reason = "length"
        tail = row.flush()
        if tail and on_text is not None and row.finish_reason != "cancelled":
            on_text(index, tail)
        results.append(Generated(row.text, row.token_ids, row.finish_reason, row.num_tokens))
    return results


def generate_replies(
    model,
    tokenizer,
    template,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    tools: Sequence[dict] | Sequence[Sequence[dict]] | None = None,
) -> list[str]:
    """The model's next assistant reply to each conversation, in order.

    Greedy when `temperature == 0`. Conversations are sorted by prompt length and generated
    `batch_size` at a time (left padded), so that short prompts are not padded to long ones.
    `tools` is one list of tool definitions for every conversation, or one list per conversation.
    Each reply stops at the template's end-of-turn token or eos; the stop token is not included.
    """
    count = len(conversations)
    if tools and not isinstance(tools[0], dict):
        per_conversation = [list(t or ()) for t in tools]
    else:
        per_conversation = [list(tools or ())] * count
    prompts = [
        encode_prompt(tokenizer, render_prompt(template, messages, per_conversation[i]))
        for i, messages in enumerate(conversations)
    ]
    stops = stop_token_ids(tokenizer, template, model)
    order = sorted(range(count), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * count
    for start in range(0, count, max(1, batch_size)):
        chunk = order[start : start + batch_size]
        results = generate_batch(
            model,
            tokenizer,
            [prompts[i] for i in chunk],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_ids=stops,
        )
        for i, result in zip(chunk, results):
            replies[i] = result.text
    return replies
