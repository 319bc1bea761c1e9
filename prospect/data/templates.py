"""Chat templates: render a canonical conversation to text and mark which characters are trained.

A template turns `Example.messages` (+ `Example.tools`) into the exact text the model sees, and
returns the character spans of every trained turn (assistant and function_call turns). A span
covers the turn's content and its end-of-turn token (`content<|im_end|>`, `content<|eot_id|>`);
it excludes the role header (so the model is not trained to write the header it is given) and the
newline some templates put after the end-of-turn token (never generated: generation stops at it).
`prospect.data.encode` tokenizes the whole text once and maps these spans onto tokens.

Each named template is defined once, as Jinja (`NAMED_SOURCES`), and everything comes from that
definition: training renders it here, with `{% generation %}` blocks marking the trained spans
(the same tags transformers reads for `return_assistant_tokens_mask`); `prospect export` writes it
next to the model without those tags (`chat_template_jinja`); chat and serve render prompts with
it; the tool calls it writes are the format `prospect.data.tool_calls` parses back.

Templates (`get_template(name, tokenizer)`):

- ``qwen``: Qwen2.5-Instruct, byte-identical to its official Jinja template, tools included. The
  tools go into the system turn, a function call is an assistant turn of `<tool_call>` blocks, and
  observations are `<tool_response>` blocks inside a user turn; consecutive observations share one
  user turn, as the official template does. Default system prompt: "You are Qwen, created by
  Alibaba Cloud. You are a helpful assistant."
- ``llama3``: Llama-3-Instruct (`<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>`),
  content trimmed of surrounding whitespace like the official template (`| trim`), `<|begin_of_text|>`
  first. No default system prompt.
- ``chatml``: `<|im_start|>role\\ncontent<|im_end|>\\n`; no default system prompt unless given
  (`default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"` gives
  SmolLM2-Instruct's template).
- ``auto`` (or None): the tokenizer's own Jinja chat template, via `tokenizer.apply_chat_template`.
  Trained spans are found by rendering prefixes: rendering messages[:i] with the generation prompt
  must give a prefix of the rendering of messages[:i+1]; the difference is turn i.

Llama-3 and ChatML have no native tool format, so the named `llama3` and `chatml` templates borrow
Qwen's (`prospect.data.tool_calls`): the tools are appended to the system message, a function call
is the assistant content `<tool_call>` blocks, and an observation is its own turn with role
``ipython`` (llama3) or ``tool`` (chatml).

Templates render the OpenAI / Hugging Face message layout (`to_hf_messages`): a function_call turn
becomes an assistant turn with `tool_calls`, an observation a `tool` turn, and a bare tool schema
`{"name", "description", "parameters"}` (as in glaive-style data) is wrapped as
`{"type": "function", "function": ...}`, which is what an OpenAI-compatible server passes at
inference time.
"""

from __future__ import annotations

import functools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from prospect.data.example import TRAINED_ROLES, Message
from prospect.data.tool_calls import TOOLS_JINJA, to_hf_messages, to_hf_tools
from prospect.errors import UserError

KNOWN_TEMPLATES = ("auto", "chatml", "llama3", "qwen")

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# End-of-turn tokens looked for in an "auto" template's assistant turn when the tokenizer's
# eos_token is not there (e.g. Llama-3's first revision has eos <|end_of_text|>, turns end <|eot_id|>).
_COMMON_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


# --------------------------------------------------------------------------------------------------
# Rendering result


@dataclass(frozen=True)
class TrainedSpan:
    """Characters `text[start:end]` of turn `messages[message_index]` that carry the loss."""

    start: int
    end: int
    message_index: int


@dataclass(frozen=True)
class RenderedChat:
    """The full text of a conversation and the spans of its trained turns, in order."""

    text: str
    trained_spans: tuple[TrainedSpan, ...]

    def span_texts(self) -> list[str]:
        return [self.text[s.start : s.end] for s in self.trained_spans]


# --------------------------------------------------------------------------------------------------
# The named templates, as Jinja. Each starts with `{%- set default_system = ... %}` (see
# `NamedTemplate.source`) and the tool macros of `TOOLS_JINJA`. Inside `{% generation %}` is what
# a trained turn learns to write: its content and the end-of-turn token.

# Qwen2.5: the system turn always exists (default system prompt), tools go into it, consecutive
# tool answers share one user turn. An assistant turn with calls is written as the official
# template writes it: content (if any), then one block per call, each after a newline.
_QWEN_JINJA = r"""
{%- if messages and messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
{%- else %}
    {%- set system = default_system %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\n' + system + '\n\n' + tools_section(tools) + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if loop.first and message.role == 'system' %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {%- if message.content %}
                {{- message.content }}
            {%- endif %}
            {%- for call in message.tool_calls or [] %}
                {%- if message.content or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {{- tool_call_block(call) }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# ChatML and Llama 3 share one shape: an optional system turn holding the tools section, one turn
# per message, tool answers in their own turn. Only the markers differ.
_CHATML_MARKERS = r"""
{%- set begin = '' %}
{%- macro header(role) %}{{- '<|im_start|>' + role + '\n' }}{%- endmacro %}
{%- macro body(text) %}{{- text }}{%- endmacro %}
{%- set end_of_turn = '<|im_end|>' %}
{%- set after_turn = '\n' %}
{%- set observation_role = 'tool' %}
"""
_LLAMA3_MARKERS = r"""
{%- set begin = '<|begin_of_text|>' %}
{%- macro header(role) %}{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' }}{%- endmacro %}
{%- macro body(text) %}{{- text | trim }}{%- endmacro %}
{%- set end_of_turn = '<|eot_id|>' %}
{%- set after_turn = '' %}
{%- set observation_role = 'ipython' %}
"""
_CHATML_LIKE_JINJA = r"""
{{- begin }}
{%- if messages and messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = default_system %}
    {%- set turns = messages %}
{%- endif %}
{%- if tools %}
    {%- if not system %}
        {%- set system = tools_section(tools) %}
    {%- else %}
        {%- set system = system + '\n\n' + tools_section(tools) %}
    {%- endif %}
{%- endif %}
{%- if system is not none %}
    {{- header('system') + body(system) + end_of_turn + after_turn }}
{%- endif %}
{%- for message in turns %}
    {%- if message.role == 'tool' %}
        {{- header(observation_role) + body(message.content) + end_of_turn + after_turn }}
    {%- elif message.role == 'assistant' %}
        {#- A turn of calls is the calls alone, one block each, separated by newlines. #}
        {%- set reply = namespace(text=message.content) %}
        {%- if message.tool_calls %}
            {%- set reply.text = '' %}
            {%- for call in message.tool_calls %}
                {%- set reply.text = reply.text + ('' if loop.first else '\n') + tool_call_block(call) %}
            {%- endfor %}
        {%- endif %}
        {{- header('assistant') }}
        {%- generation %}
            {{- body(reply.text) + end_of_turn }}
        {%- endgeneration %}
        {{- after_turn }}
    {%- else %}
        {{- header(message.role) + body(message.content) + end_of_turn + after_turn }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- header('assistant') }}
{%- endif %}
"""


@dataclass(frozen=True)
class _NamedSpec:
    jinja: str
    end_of_turn: str  # the token that ends a turn (generation stops at it)
    required_tokens: tuple[str, ...]  # markers that must be single tokens of the tokenizer
    default_system: str | None


NAMED_SOURCES = {
    "qwen": _NamedSpec(TOOLS_JINJA + _QWEN_JINJA, "<|im_end|>", ("<|im_start|>", "<|im_end|>"), QWEN_DEFAULT_SYSTEM),
    "chatml": _NamedSpec(_CHATML_MARKERS + TOOLS_JINJA + _CHATML_LIKE_JINJA, "<|im_end|>",
                         ("<|im_start|>", "<|im_end|>"), None),
    "llama3": _NamedSpec(_LLAMA3_MARKERS + TOOLS_JINJA + _CHATML_LIKE_JINJA, "<|eot_id|>",
                         ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), None),
}

# `auto` with a default system prompt: the tokenizer's own template, given a system turn when the
# conversation has none (what JinjaTemplate does in Python).
_WITH_DEFAULT_SYSTEM_JINJA = r"""
{%- if not (messages and messages[0].role == 'system') %}
    {%- set messages = [{'role': 'system', 'content': default_system}] + messages %}
{%- endif %}
"""


def _jinja_string(value: str | None) -> str:
    """A Python string as a Jinja literal (Jinja string literals take JSON's escapes)."""
    return "none" if value is None else json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Rendering the Jinja with trained spans. Rendering must give exactly what transformers'
# `apply_chat_template` gives (the same environment options and `tojson`); the `generation` tag
# wraps its body in two reserved characters, which `_take_spans` turns into offsets and removes.

_SPAN_OPEN, _SPAN_CLOSE = "\ue000", "\ue001"  # Unicode private use: never in real text (checked)


@functools.lru_cache(maxsize=32)
def _compiled(source: str):
    """The Jinja template `source`, compiled once per process (compiled templates do not pickle)."""
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class TrainedTurns(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _SPAN_OPEN + caller() + _SPAN_CLOSE

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[TrainedTurns, "jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)


def _take_spans(marked: str, trained_indexes: list[int], where: str) -> RenderedChat:
    """Remove the span markers of `marked`; the k-th span belongs to message `trained_indexes[k]`."""
    pieces = marked.split(_SPAN_OPEN)
    text_parts, spans, length = [pieces[0]], [], len(pieces[0])
    for piece in pieces[1:]:
        trained, _, rest = piece.partition(_SPAN_CLOSE)
        spans.append((length, length + len(trained)))
        text_parts += [trained, rest]
        length += len(trained) + len(rest)
    text = "".join(text_parts)
    if len(spans) != len(trained_indexes) or _SPAN_CLOSE in text or _SPAN_OPEN in text:
        raise UserError(
            f"{where}the conversation contains U+E000 or U+E001, characters prospect reserves to mark "
            "trained turns; remove them from the data"
        )
    return RenderedChat(text, tuple(TrainedSpan(s, e, i) for (s, e), i in zip(spans, trained_indexes)))


# --------------------------------------------------------------------------------------------------
# Templates


class Template(ABC):
    """Renders canonical conversations; see the module docstring for the formats."""

    name: str
    end_of_turn: str  # the token that ends a turn (generation stops at it)
    default_system: str | None

    @abstractmethod
    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict] = (),
        *,
        add_generation_prompt: bool = False,
        origin: str = "",
    ) -> RenderedChat:
        """Full text of the conversation (+ the assistant header when `add_generation_prompt`) and
        the trained spans. `origin` ("file#index") is only used in error messages."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class NamedTemplate(Template):
    """One of `NAMED_SOURCES`, rendered from its Jinja (see the module docstring)."""

    def __init__(self, name: str, default_system: str | None = None) -> None:
        spec = NAMED_SOURCES[name]
        self.name = name
        self.end_of_turn = spec.end_of_turn
        self.required_tokens = spec.required_tokens
        self.default_system = spec.default_system if default_system is None else default_system
        self.source = "{%- set default_system = " + _jinja_string(self.default_system) + " %}" + spec.jinja

    def render(self, messages, tools=(), *, add_generation_prompt=False, origin=""):
        where = f"{origin}: " if origin else ""
        for message in messages:
            if message.role not in ("system", "user", "observation") and message.role not in TRAINED_ROLES:
                raise UserError(
                    f"{where}unknown message role {message.role!r}; expected one of system, user, assistant, "
                    "function_call, observation"
                )
        marked = _compiled(self.source).render(
            messages=to_hf_messages(messages, origin),
            tools=to_hf_tools(tools) or None,
            add_generation_prompt=add_generation_prompt,
        )
        trained_indexes = [index for index, message in enumerate(messages) if message.role in TRAINED_ROLES]
        return _take_spans(marked, trained_indexes, where)


class JinjaTemplate(Template):
    """The tokenizer's own chat template ("auto"), rendered by `tokenizer.apply_chat_template`.

    Trained spans come from prefix renders: text(messages[:i], generation prompt) must be a prefix
    of text(messages[:i+1]); the rest, up to and including the end-of-turn token, is turn i.
    """

    name = "auto"

    def __init__(self, tokenizer, default_system: str | None = None, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if isinstance(self.chat_template, dict):  # several named templates: use the default one
            self.chat_template = self.chat_template.get("default")
        if not self.chat_template:
            raise UserError(
                "the tokenizer has no chat template, so `template: auto` cannot be used; "
                f"set `template:` to one of {', '.join(n for n in KNOWN_TEMPLATES if n != 'auto')}"
            )
        self.supports_tools = "tools" in self.chat_template or "tool_calls" in self.chat_template
        eos = getattr(tokenizer, "eos_token", None)
        self._end_of_turn_candidates = tuple(dict.fromkeys(([eos] if eos else []) + list(_COMMON_END_OF_TURN_TOKENS)))
        self.end_of_turn = eos or ""

    def _apply(self, hf_messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            hf_messages,
            tools=tools,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def _end_of_turn_in(self, turn_text: str) -> int:
        """Length of `turn_text` up to and including its end-of-turn token (eos first, else the earliest known one)."""
        eos, *others = self._end_of_turn_candidates
        if eos in turn_text:
            return turn_text.index(eos) + len(eos)
        found = [(turn_text.index(token), -len(token), token) for token in others if token in turn_text]
        if not found:
            return len(turn_text.rstrip())
        position, _, token = min(found)
        return position + len(token)

    def render(self, messages, tools=(), *, add_generation_prompt=False, origin=""):
        where = f"{origin}: " if origin else ""
        uses_tools = bool(tools) or any(m.role in ("function_call", "observation") for m in messages)
        if uses_tools and not self.supports_tools:
            raise UserError(
                f"{where}the data has tools or function calls but the tokenizer's chat template ignores tools; "
                "set `template: qwen` (or llama3 / chatml, which write tools in Qwen's format)"
            )
        hf_messages = to_hf_messages(messages, origin)
        offset = 0  # hf index = canonical index + offset
        if self.default_system is not None and not (messages and messages[0].role == "system"):
            hf_messages.insert(0, {"role": "system", "content": self.default_system})
            offset = 1
        hf_tools = to_hf_tools(tools) or None
        try:
            text = self._apply(hf_messages, hf_tools, add_generation_prompt)
            spans = []
            for index, message in enumerate(messages):
                if message.role not in TRAINED_ROLES:
                    continue
                hf_index = index + offset
                if hf_index == 0:
                    raise UserError(
                        f"{where}the conversation starts with an assistant turn, which `template: auto` cannot "
                        "locate; start with a user turn or set `template:` to a named template"
                    )
                prompt = self._apply(hf_messages[:hf_index], hf_tools, True)
                with_turn = self._apply(hf_messages[: hf_index + 1], hf_tools, False)
                turn_end = len(prompt) + self._end_of_turn_in(with_turn[len(prompt) :])
                if not with_turn.startswith(prompt) or not text.startswith(with_turn[:turn_end]):
                    raise UserError(
                        f"{where}the tokenizer's chat template does not render conversations prefix by prefix "
                        f"(message {index}), so the trained turns cannot be located; set `template:` to one of "
                        "qwen, llama3, chatml"
                    )
                spans.append(TrainedSpan(len(prompt), turn_end, index))
        except UserError:
            raise
        except Exception as err:  # Jinja errors raised by the template itself (raise_exception, bad roles)
            raise UserError(
                f"{where}the tokenizer's chat template failed on this conversation ({type(err).__name__}: {err}); "
                "fix the conversation or set `template:` to one of qwen, llama3, chatml"
            ) from None
        return RenderedChat(text, tuple(spans))


# --------------------------------------------------------------------------------------------------


def _check_special_tokens(template_name: str, required: Sequence[str], tokenizer) -> None:
    """A named template's markers must be single tokens, else the model never sees a real end-of-turn."""
    missing = [t for t in required if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if missing:
        raise UserError(
            f"template {template_name!r} needs the special tokens {', '.join(missing)}, which this tokenizer "
            "does not have; set `template:` to the one the model was trained with (or `auto`)"
        )



def get_template(name: str | None, tokenizer, default_system: str | None = None) -> Template:
    """The template called `name` ("qwen", "llama3", "chatml", or "auto"/None for the tokenizer's own).

    `default_system` is the system prompt used when a conversation has none (qwen falls back to
    Qwen's own default). For named templates, `tokenizer` (may be None) is only checked to have the
    template's special tokens.
    """
    key = "auto" if name is None else str(name).strip().lower()
    if key in ("auto", ""):
        return JinjaTemplate(tokenizer, default_system)
    if key not in NAMED_SOURCES:
        raise UserError(f"unknown template {name!r}; known templates: {', '.join(KNOWN_TEMPLATES)}")
    template = NamedTemplate(key, default_system)
    if tokenizer is not None:
        _check_special_tokens(key, template.required_tokens, tokenizer)
    return template


def chat_template_jinja(template: Template) -> str:
    """The Jinja chat template that renders like `template`, as export writes it next to the model.

    A named template is its own definition without the `{% generation %}` tags: they are an
    extension of transformers' renderer, and servers with another Jinja engine would refuse them.
    """
    if isinstance(template, NamedTemplate):
        return re.sub(r"^[ \t]*\{%- (end)?generation %\}\n", "", template.source, flags=re.MULTILINE)
    if template.default_system is None:
        return template.chat_template
    return "{%- set default_system = " + _jinja_string(template.default_system) + " %}" + (
        _WITH_DEFAULT_SYSTEM_JINJA + template.chat_template
    )
