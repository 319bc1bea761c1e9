"""`prospect serve`: an OpenAI-compatible HTTP server for one base model and several LoRA adapters.

Endpoints (FastAPI on uvicorn, bound to `host`:`port`, 127.0.0.1:8000 by default):

- `POST /v1/chat/completions` — the OpenAI Chat Completions API, streamed (server-sent events) or
  not. The request's `model` picks what answers: the base model's name (its folder's name) or an
  adapter's name (the adapter folder's name, or `name` in `adapter_name_or_path: name=path,...`).
  Supported fields: `messages` (system/developer, user, assistant — with `tool_calls` —, tool),
  `max_tokens` / `max_completion_tokens`, `temperature` (0 = greedy), `top_p`, `stop`, `stream`,
  `stream_options.include_usage`, `tools`, `tool_choice` (`none` drops the tools; any other value
  lets the model decide). Other fields are accepted and ignored. `temperature`, `top_p` and
  `max_tokens` default to the config's `temperature`, `top_p` and `max_new_tokens`.
- `GET /v1/models` (and `/v1/models/{id}`) — the base model and every adapter.
- `GET /health` — `{"status": "ok"}`, without authentication (for load balancers and scripts).
- `GET /` — a chat page (prospect/web/chat.html: plain HTML and JS, nothing fetched from elsewhere):
  a model picker, streamed replies, a thumbs up / down under each reply, `/reset`.
- `POST /v1/feedback` — `{"id": "<completion id>", "label": true | false, "note": "..."}`: a thumbs up
  or down on a reply this server returned, appended to `feedback_dir` as a KTO dataset
  (`prospect.feedback`); 404 when `feedback_dir` is not set.

Each model answers with the chat template it was trained with (the adapter's run_config.yaml; see
`prospect.inference.resolve_template`). With tools in the request, `<tool_call>{json}</tool_call>`
blocks in the reply come back as OpenAI `tool_calls` with `finish_reason: "tool_calls"`.

Errors are OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for a
malformed body or a request over the context length (prompt + `max_tokens` > the model's maximum
positions), 401 for a missing or wrong API key (`api_key` or $PROSPECT_API_KEY; clients send
`Authorization: Bearer <key>`), 404 for an unknown model, 500 if generation itself fails. None of
them stops the server.

Concurrency — **batched**. The event loop only parses requests and relays text; generation runs in
one worker thread that owns the model. Requests wait in a queue; the worker takes the oldest one
together with every queued request that has the same sampling settings (temperature, top_p), up to
`serve_batch_size`, whatever adapter each asks for: PEFT runs such a mixed batch with each row
going through its own adapter (or none, for the base model). Requests that arrive while a batch
runs wait for the next one (a running batch is never joined), and a streaming client that
disconnects has its row dropped at the next token.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request)
# at run time, and those names are imported inside create_app.
import asyncio
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prospect.errors import UserError
from prospect.data.example import Message
from prospect.data.tool_calls import ToolCall, parse_tool_calls, tool_calls_as_message
from prospect.feedback import MAX_BODY_BYTES, Completion, FeedbackLog
from prospect.inference import BASE_MODEL, Generated
from prospect.openai_api import ApiError, ServedModel, ToolCallHoldback, bad_request, parse_request

CHAT_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"  # the page at `/`, shipped in the package

# --------------------------------------------------------------------------------------------------
# What is served


@dataclass
class Job:
    """One request's generation, as the worker thread sees it."""

    prompt_ids: list[int]
    adapter_key: str
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    on_text: Callable[[str], None]
    on_done: Callable[[Generated], None]
    on_error: Callable[[BaseException], None]
    cancelled: bool = False

    @property
    def sampling(self) -> tuple[float, float]:
        """Requests with equal `sampling` can share a batch (greedy ignores top_p)."""
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)


class Engine:
    """Owns the model; one worker thread generates queued jobs in batches (see the module docstring)."""

    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch_size: int, uses_adapters: bool):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.max_batch_size = max_batch_size
        self.uses_adapters = uses_adapters
        self._queue: deque[Job] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prospect-generation", daemon=True)
        self.batches = 0  # batches run so far (for tests and curiosity)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()

    def submit(self, job: Job) -> None:
        with self._wakeup:
            self._queue.append(job)
            self._wakeup.notify()

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job plus the queued jobs with its sampling settings, in arrival order."""
        with self._wakeup:
            while not self._queue and not self._closed:
                self._wakeup.wait()
            if self._closed:
                return None
            first = self._queue.popleft()
            batch, others = [first], deque()
            while self._queue and len(batch) < self.max_batch_size:
                job = self._queue.popleft()
                (batch if job.sampling == first.sampling else others).append(job)
            self._queue.extendleft(reversed(others))  # the skipped jobs keep their place at the front
            return batch

    def _run(self) -> None:
        from prospect.inference import generate_batch

        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled]
            if not batch:
                continue
            temperature, top_p = batch[0].sampling
            try:
                results = generate_batch(
                    self.model,
                    self.tokenizer,
                    [job.prompt_ids for job in batch],
                    max_new_tokens=[job.max_new_tokens for job in batch],
                    temperature=temperature,
                    top_p=top_p,
                    stop_ids=self.stop_ids,
                    stop_strings=[job.stop for job in batch],
                    adapter_names=[job.adapter_key for job in batch] if self.uses_adapters else None,
                    on_text=lambda row, text: batch[row].on_text(text),
                    is_cancelled=lambda row: batch[row].cancelled,
                )
            except Exception as err:  # a failed batch fails its requests, not the server
                for job in batch:
                    job.on_error(err)
                continue
            finally:
                self.batches += 1
            for job, result in zip(batch, results):
                job.on_done(result)


# --------------------------------------------------------------------------------------------------
# The application


def _tool_calls_json(calls: list[ToolCall], *, with_index: bool = False) -> list[dict]:
    out = []
    for index, call in enumerate(calls):
        entry = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        out.append({"index": index, **entry} if with_index else entry)
    return out


def _finish_reason(result: Generated, calls: list[ToolCall]) -> str:
    if calls:
        return "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def load_served_models(config):
    """(model, tokenizer, {name: ServedModel}) — the base model and every adapter of the config."""
    from prospect.inference import base_model_name, load_inference_model, parse_adapters, resolve_template

    model, tokenizer, _ = load_inference_model(config)  # every adapter attached; requests pick theirs
    adapters = parse_adapters(config.adapter_name_or_path)
    base = base_model_name(config)
    served = {base: ServedModel(base, BASE_MODEL, resolve_template(config, tokenizer), str(config.model_name_or_path))}
    for spec in adapters:
        if spec.name in served:
            raise UserError(
                f"adapter_name_or_path: the adapter name {spec.name!r} is the base model's name; name it, "
                f"e.g. `adapter_name_or_path: my-adapter={spec.path}`."
            )
        served[spec.name] = ServedModel(spec.name, spec.key, resolve_template(config, tokenizer, spec.path), spec.path)
    return model, tokenizer, served


def create_app(config, *, loaded=None):
    """The FastAPI application; `loaded` = (model, tokenizer, served models) skips loading (tests)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    from prospect.inference import context_length, encode_prompt, render_prompt, stop_token_ids

    model, tokenizer, served = loaded or load_served_models(config)
    stop_ids = list(dict.fromkeys(i for m in served.values() for i in stop_token_ids(tokenizer, m.template, model)))
    engine = Engine(model, tokenizer, stop_ids, config.serve_batch_size, uses_adapters=len(served) > 1)
    max_context = context_length(model, tokenizer)
    api_key = config.api_key or os.environ.get("PROSPECT_API_KEY") or None
    feedback = FeedbackLog(config.feedback_dir) if config.feedback_dir else None

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="prospect", lifespan=lifespan,
                  description="OpenAI-compatible chat completions for a base model and its adapters")
    app.state.engine, app.state.served, app.state.config = engine, served, config

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return JSONResponse(ApiError(500, f"{type(err).__name__}: {err}", type="server_error").body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    def model_card(m: ServedModel) -> dict:
        card = {"id": m.name, "object": "model", "created": m.created, "owned_by": "prospect", "root": m.path}
        if m.adapter_key != BASE_MODEL:
            card["parent"] = next(s.name for s in served.values() if s.adapter_key == BASE_MODEL)
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():  # static; the API calls it makes carry the key
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in served.values()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
    async def get_model(model_id: str):
        if model_id not in served:
            raise ApiError(404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
        return model_card(served[model_id])

    @app.post("/v1/feedback", dependencies=[Depends(check_key)])
    async def post_feedback(request: Request):
        if feedback is None:
            raise ApiError(404, "Feedback is off: start prospect serve with feedback_dir: <folder>.",
                           code="feedback_off")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body is {declared} bytes; feedback takes at most {MAX_BODY_BYTES}.",
                           code="request_too_large")
        return await asyncio.to_thread(feedback.record, await request.body())  # fsync off the event loop

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"The request body is not valid JSON: {err}.") from None
        req = parse_request(body, served, config)
        try:
            prompt = render_prompt(req.model.template, req.messages, req.tools)
        except UserError as err:
            raise bad_request(f"The messages cannot be rendered with the {req.model.template.name!r} template: {err}",
                       "messages") from None
        prompt_ids = encode_prompt(tokenizer, prompt)
        max_tokens = _token_budget(len(prompt_ids), req.max_tokens, max_context, config.max_new_tokens)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        job = Job(
            prompt_ids=prompt_ids, adapter_key=req.model.adapter_key, max_new_tokens=max_tokens,
            temperature=req.temperature, top_p=req.top_p, stop=req.stop,
            on_text=lambda text: post("text", text), on_done=lambda result: post("done", result),
            on_error=lambda err: post("error", err),
        )
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        engine.submit(job)

        def remember(text: str, calls: list[ToolCall]) -> None:
            if feedback is not None:
                reply = tool_calls_as_message(calls) if calls else Message("assistant", text)
                feedback.remember(completion_id, Completion(
                    req.messages + [reply], req.tools, req.model.name,
                    {"temperature": req.temperature, "top_p": req.top_p, "max_tokens": max_tokens}))

        if not req.stream:
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "done":
                        break
                    if kind == "error":
                        raise ApiError(500, f"generation failed: {type(value).__name__}: {value}", type="server_error")
            finally:
                job.cancelled = True  # no-op once done; drops the row if this request was abandoned
            content, calls = parse_tool_calls(value.text) if req.tools else (value.text, [])
            remember(value.text, calls)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = _tool_calls_json(calls)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": req.model.name,
                "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(value, calls),
                             "logprobs": None}],
                "usage": _usage(len(prompt_ids), value.num_tokens),
            }

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return _sse({
                "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": req.model.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            })

        async def stream():
            holdback = ToolCallHoldback() if req.tools else None
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        piece = holdback.feed(value) if holdback else value
                        if piece:
                            yield chunk({"content": piece})
                    elif kind == "error":
                        yield _sse(ApiError(500, f"generation failed: {type(value).__name__}: {value}",
                                            type="server_error").body())
                        break
                    else:
                        rest, calls = holdback.finish() if holdback else ("", [])
                        remember(value.text, calls)
                        if rest:
                            yield chunk({"content": rest})
                        if calls:
                            yield chunk({"tool_calls": _tool_calls_json(calls, with_index=True)})
                        yield chunk({}, _finish_reason(value, calls))
                        if req.include_usage:
                            yield _sse({
                                "id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": req.model.name, "choices": [],
                                "usage": _usage(len(prompt_ids), value.num_tokens),
                            })
                        break
                yield _sse("[DONE]")
            finally:
                job.cancelled = True  # the client left early: stop generating its row

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _token_budget(prompt_tokens: int, requested: int | None, max_context: int | None, default: int) -> int:
    """How many tokens a reply may have; ApiError 400 when the request does not fit the context."""
    if max_context is None:
        return requested or default
    if prompt_tokens >= max_context:
        raise bad_request(
            f"This model's maximum context length is {max_context} tokens, but the messages take {prompt_tokens} "
            "tokens. Shorten the messages.", "messages", "context_length_exceeded")
    if requested is not None and prompt_tokens + requested > max_context:
        raise bad_request(
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the completion). "
            "Reduce the length of the messages or of max_tokens.", "max_tokens", "context_length_exceeded")
    return requested or min(default, max_context - prompt_tokens)


# --------------------------------------------------------------------------------------------------
# The command


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0 = any free port), or a UserError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(
            f"host/port: cannot listen on {host}:{port} ({err.strerror or err}); choose another port "
            "(`port=8001`, or `port=0` for any free one) or host."
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(config) -> None:
    """`prospect serve`: load the models, listen, answer until Ctrl-C."""
    import uvicorn

    sock = listening_socket(config.host, config.port)  # before loading: a busy port fails fast
    app = create_app(config)
    host, port = sock.getsockname()[:2]
    served = app.state.served
    names = ", ".join(served)
    key_note = "API key required" if (config.api_key or os.environ.get("PROSPECT_API_KEY")) else "no API key"
    print(f"Serving {names} on http://{config.host}:{port}/v1 (OpenAI-compatible; {key_note}; "
          f"batches of up to {config.serve_batch_size})", flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not key_note.startswith("API key"):
        print(f"warning: listening on {host} without an API key: anyone who can reach this port can use the model.",
              file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass
    print("Server stopped.", flush=True)
