"""`prospect serve` with the official `openai` client on loopback: chat, streaming, models, adapters,
tools, API key, bad requests, context length, 50 concurrent requests, and the command itself."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prospect.config import load_config
from prospect.data.example import Message
from prospect.data.tool_calls import parse_tool_calls

# The tiny-model builders live in test_export.py (pytest puts tests/ on sys.path).
from test_export import build_random_adapter, build_tiny_qwen, one_torch_thread  # noqa: F401 (autouse)

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
MAX_POSITIONS = 512
PROMPTS = ["Hello!", "What is 2 + 2?", "Tell me a story.", "Name a colour.", "Bonjour, ça va ?"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm_tokenizer):
    """A tiny base (its tokenizer's own template) and adapters `alpha` (trained with qwen) and `beta`."""
    root = tmp_path_factory.mktemp("serve")
    base = build_tiny_qwen(root / "base", smollm_tokenizer, max_positions=MAX_POSITIONS)
    alpha = build_random_adapter(base, root / "alpha", seed=11, run_config={"template": "qwen"})
    beta = build_random_adapter(base, root / "beta-folder", seed=12, run_config={"template": "qwen"})
    overrides = [f"model_name_or_path={base}", f"adapter_name_or_path={alpha},beta={beta}", "max_new_tokens=8",
                 "temperature=0", f"api_key={API_KEY}", "serve_batch_size=8"]
    return {"root": root, "base": base, "alpha": alpha, "beta": beta, "overrides": overrides}


class RunningServer:
    """`create_app` on uvicorn in a background thread, on a free loopback port."""

    def __init__(self, config):
        import uvicorn

        from prospect.serve import create_app, listening_socket

        self.app = create_app(config)
        self.socket = listening_socket("127.0.0.1", 0)
        self.port = self.socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(models):
    running = RunningServer(load_config(None, models["overrides"]))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(models):
    """Greedy replies computed offline (prospect.inference, one model per adapter, no server)."""
    from prospect.inference import generate_replies, load_inference_model

    answers = {}
    for name, adapter in (("base", None), ("alpha", models["alpha"]), ("beta", models["beta"])):
        overrides = [o for o in models["overrides"] if not o.startswith("adapter_name_or_path")]
        config = load_config(None, overrides + ([f"adapter_name_or_path={adapter}"] if adapter else []))
        model, tokenizer, template = load_inference_model(config)
        replies = generate_replies(model, tokenizer, template, [[Message("user", p)] for p in PROMPTS],
                                   max_new_tokens=8, batch_size=1)
        answers[name] = dict(zip(PROMPTS, replies))
    return answers


def ask(client, model: str, prompt: str, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kwargs)


# --------------------------------------------------------------------------------------------------
# The API with the official client


def test_models_lists_the_base_and_every_adapter(client):
    cards = {model.id: model for model in client.models.list()}
    assert list(cards) == ["base", "alpha", "beta"]
    assert cards["alpha"].owned_by == "prospect" and cards["beta"].model_extra["parent"] == "base"
    assert client.models.retrieve("beta").id == "beta"


def test_each_model_answers_as_the_offline_pipeline_does(client, expected):
    for name in ("base", "alpha", "beta"):
        response = ask(client, name, PROMPTS[1])
        choice = response.choices[0]
        assert response.model == name and response.object == "chat.completion"
        assert choice.message.role == "assistant" and choice.message.content == expected[name][PROMPTS[1]]
        assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
        assert response.usage.completion_tokens <= 8
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    # The request's model picks the adapter: different adapters, different answers.
    assert len({expected[name][PROMPTS[1]] for name in ("base", "alpha", "beta")}) == 3


def test_streaming_sends_the_same_reply_in_pieces(client, expected):
    chunks = list(ask(client, "alpha", PROMPTS[2], stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected["alpha"][PROMPTS[2]]
    assert len([d for d in deltas if d.content]) >= 2  # token by token, not in one piece
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8


def test_sampling_settings_and_stop_strings(client, expected):
    reply = expected["beta"][PROMPTS[0]]
    cut = reply[len(reply) // 2 :][:3]
    stopped = ask(client, "beta", PROMPTS[0], stop=[cut], temperature=0).choices[0]
    assert stopped.message.content == reply[: reply.index(cut)] and stopped.finish_reason == "stop"
    sampled = ask(client, "beta", PROMPTS[0], temperature=1.5, top_p=0.9, max_tokens=3)
    assert sampled.usage.completion_tokens <= 3


# --------------------------------------------------------------------------------------------------
# Tool calls

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class ForcedOutput:
    """Makes the served model write `text` then end its turn, whatever the prompt: a forward hook
    overwrites the last position's logits (the real generation loop, decoding and parsing still run)."""

    def __init__(self, server, text: str):
        self.engine = server.app.state.engine
        tokenizer = self.engine.tokenizer
        self.script = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.step = 0

    def hook(self, module, args, kwargs, output):
        input_ids = kwargs.get("input_ids")
        if input_ids is not None and input_ids.shape[1] > 1:  # the prompt: a new generation starts
            self.step = 0
        forced = output.logits[:, -1].clone().fill_(-1e4)
        forced[:, self.script[min(self.step, len(self.script) - 1)]] = 1e4
        output.logits[:, -1] = forced
        self.step += 1
        return output

    def __enter__(self):
        self.handle = self.engine.model.get_base_model().register_forward_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_tool_calls_come_back_in_the_openai_shape(client, server):
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 25}"},
        {"role": "assistant", "content": "25 °C in Rome."},
        {"role": "user", "content": "And in Paris?"},
    ]
    room = {"model": "alpha", "messages": history, "max_tokens": 64}  # the call is ~25 tokens
    with ForcedOutput(server, TOOL_CALL_TEXT):
        response = client.chat.completions.create(tools=[WEATHER_TOOL], **room)
        chunks = list(client.chat.completions.create(tools=[WEATHER_TOOL], stream=True, **room))
        no_tools = client.chat.completions.create(**room)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.delta.content or "" for c in streamed) == ""  # the call's text is not streamed as content
    (streamed_call,) = [t for c in streamed for t in (c.delta.tool_calls or [])]
    assert streamed_call.index == 0 and streamed_call.function.name == "get_weather"
    assert json.loads(streamed_call.function.arguments) == {"city": "Paris"}
    assert streamed[-1].finish_reason == "tool_calls"

    # Without tools in the request the same text is plain content.
    assert no_tools.choices[0].message.content == TOOL_CALL_TEXT and no_tools.choices[0].finish_reason == "stop"


def test_tool_call_parser():
    two_calls = TOOL_CALL_TEXT + "\n" + TOOL_CALL_TEXT.replace("Paris", "Oslo")
    content, calls = parse_tool_calls("Let me check.\n" + two_calls)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert len({c.id for c in calls}) == 2
    # Unclosed last block (the reply ran out of tokens right after the JSON), string arguments.
    _, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}')
    assert calls[0].name == "f" and calls[0].arguments == '{"x": 1}'
    # Not JSON, or no name: plain text, no calls.
    for text in ["<tool_call>\n{not json}\n</tool_call>", '<tool_call>{"arguments": {}}</tool_call>', "no call"]:
        assert parse_tool_calls(text) == (text, [])


def test_streaming_holdback_releases_text_that_is_not_a_tool_call():
    from prospect.openai_api import ToolCallHoldback

    holdback = ToolCallHoldback()
    pieces = [holdback.feed(p) for p in ["Hi", " there <", "b>", " ok\n", "<tool", "_call>\n{", '"name": "f"}']]
    assert "".join(pieces) == "Hi there <b> ok"
    assert holdback.finish()[1][0].name == "f"
    plain = ToolCallHoldback()
    assert "".join([plain.feed("a <tool"), plain.feed(" b"), plain.finish()[0]]) == "a <tool b"


# --------------------------------------------------------------------------------------------------
# Refusals


def test_a_wrong_or_missing_api_key_is_refused_with_401(server):
    import httpx
    import openai

    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=server.base_url, api_key="wrong-key", max_retries=0).models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    no_key = httpx.post(f"{server.base_url}/chat/completions", json={})  # no Authorization header at all
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"model": "alpha"}, 400, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "'model' is required"),
        ({"model": "gamma", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
        ({"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role must be one of"),
        ({"model": "alpha", "messages": [{"role": "user", "content": 42}]}, 400, "content must be a string"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "number"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "positive"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n=1"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
         400, "tools[0]"),
        ({"model": "alpha", "messages": [{"role": "assistant", "tool_calls": "get_weather"}]}, 400,
         "tool_calls must be a non-empty list"),
        # The base model answers with its tokenizer's own template (SmolLM2's), which has no tools.
        ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]}, 400,
         "cannot be rendered"),
    ],
)
def test_malformed_requests_get_a_json_4xx_and_the_server_stays_up(server, body, status, message):
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server.base_url}/chat/completions"
    response = (httpx.post(url, content=body, headers=headers) if isinstance(body, bytes)
                else httpx.post(url, json=body, headers=headers))
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 200


def test_a_request_over_the_context_length_is_refused(client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "alpha", "hello " * (MAX_POSITIONS + 10))
    assert caught.value.body["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_POSITIONS} tokens" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError, match=r"you requested \d+ tokens"):
        ask(client, "alpha", "hello", max_tokens=MAX_POSITIONS)


# --------------------------------------------------------------------------------------------------
# Load


def test_fifty_concurrent_requests_are_all_answered_correctly(client, server, expected):
    jobs = [(name, prompt, index % 4 == 0) for index, (name, prompt) in
            enumerate((name, prompt) for prompt in PROMPTS for name in ("base", "alpha", "beta"))] * 4
    jobs = jobs[:50]
    batches_before = server.app.state.engine.batches

    def run(job):
        name, prompt, stream = job
        started = time.perf_counter()
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in ask(client, name, prompt, stream=True)
                           if c.choices)
        else:
            text = ask(client, name, prompt).choices[0].message.content
        return text, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.perf_counter() - started

    wrong = [(job, text) for job, (text, _) in zip(jobs, results) if text != expected[job[0]][job[1]]]
    assert wrong == []
    latencies = sorted(latency for _, latency in results)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    batches = server.app.state.engine.batches - batches_before
    print(f"\nload test: {len(jobs)} concurrent requests in {elapsed:.2f} s = {len(jobs) / elapsed:.1f} requests/s; "
          f"latency p50 {p50:.2f} s, p99 {p99:.2f} s; {batches} batches")
    assert batches < len(jobs)  # requests were batched, not run one by one
    assert ask(client, "alpha", PROMPTS[0]).choices[0].message.content == expected["alpha"][PROMPTS[0]]


# --------------------------------------------------------------------------------------------------
# The command


def test_the_serve_command_listens_answers_and_stops_on_ctrl_c(models, expected):
    import openai

    config_file = models["root"] / "serve.yaml"
    config_file.write_text("\n".join(o.replace("=", ": ", 1) for o in models["overrides"]) + "\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "prospect", "serve", str(config_file), "port=0", "serve_batch_size=2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},  # see one_torch_thread
    )
    try:
        banner = ""
        while "Serving" not in banner:
            line = process.stdout.readline()
            assert line, f"prospect serve exited early:\n{banner}"
            banner += line
        assert "Serving base, alpha, beta on http://127.0.0.1:" in banner and "API key required" in banner
        port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        assert ask(client, "beta", PROMPTS[3]).choices[0].message.content == expected["beta"][PROMPTS[3]]
        process.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop, exit status 0
        assert process.wait(timeout=30) == 0
        assert "Server stopped." in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
