"""`POST /v1/feedback` of `prospect serve`: thumbs on the server's own replies become a KTO dataset that
`prospect train` reads as it is; bad feedback writes nothing; 50 concurrent clients; torn lines."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from prospect.config import load_config
from prospect.data.formats import load_examples
from prospect.data.registry import resolve_datasets
from test_serve import API_KEY, PROMPTS, RunningServer, ask, models  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def feedback_server(models, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("feedback")
    running = RunningServer(load_config(None, models["overrides"] + [f"feedback_dir={folder}"]))
    running.folder = folder
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(feedback_server):
    import openai

    return openai.OpenAI(base_url=feedback_server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def rate(server, body, *, key=API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base_url}/feedback", content=content, headers=headers, timeout=60)


def records(server) -> list[dict]:
    path = server.folder / "feedback.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_rated_replies_become_a_kto_dataset_that_train_reads(feedback_server, client):
    first = ask(client, "alpha", PROMPTS[1])
    streamed = list(ask(client, "base", PROMPTS[2], stream=True))
    streamed_id, streamed_text = streamed[0].id, "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    reply = first.choices[0].message.content
    follow_up = client.chat.completions.create(model="alpha", messages=[
        {"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": reply},
        {"role": "user", "content": "And 3 + 3?"}])
    before = len(records(feedback_server))
    for completion_id, label, note in ((first.id, True, None), (streamed_id, False, "rambles"),
                                       (follow_up.id, False, None)):
        response = rate(feedback_server, {"id": completion_id, "label": label, **({"note": note} if note else {})})
        assert response.status_code == 200 and response.json() == {"id": completion_id, "object": "feedback",
                                                                   "label": label}, response.text
    written = records(feedback_server)[before:]
    assert [r["id"] for r in written] == [first.id, streamed_id, follow_up.id]
    assert written[0]["messages"] == [{"role": "user", "content": PROMPTS[1]},
                                      {"role": "assistant", "content": reply, "label": True}]
    assert written[0]["model"] == "alpha" and written[0]["sampling"]["temperature"] == 0 and written[0]["note"] is None
    assert written[1]["messages"][-1] == {"role": "assistant", "content": streamed_text, "label": False}
    assert written[1]["note"] == "rambles" and written[1]["model"] == "base"
    # A later turn is rated as that turn: the earlier exchange is its prompt, unrated.
    assert [m.get("label") for m in written[2]["messages"]] == [None, None, None, False]
    assert written[2]["messages"][1] == {"role": "assistant", "content": reply}

    # `prospect train` reads the folder as it is: dataset `feedback`, one KTO example per rating.
    [spec] = resolve_datasets(str(feedback_server.folder), ["feedback"])
    examples, skipped = load_examples(spec, str(feedback_server.folder), stage="kto")
    rated = [turn for example in examples for turn in example.rated_turns()]
    assert not skipped and len(rated) == len(records(feedback_server))
    assert [e.label for e in rated[before:]] == [True, False, False]
    assert [m.content for m in rated[before + 2].messages] == [PROMPTS[1], reply, "And 3 + 3?",
                                                               follow_up.choices[0].message.content]


@pytest.mark.parametrize("body, status, param", [
    ({"id": "chatcmpl-nope", "label": True}, 404, "id"),
    ({"label": True}, 400, "id"),
    ("VALID", 400, "label"),  # the label "yes"
    ("NOTE", 400, "note"),  # a 5000-character note
    ("EXTRA", 400, "rating"),
    (b"{not json", 400, None),
    (b"x" * 20_000, 413, None),
])
def test_bad_feedback_is_an_openai_error_and_writes_nothing(feedback_server, client, body, status, param):
    completion_id = ask(client, "base", PROMPTS[0]).id
    if isinstance(body, str):  # the cases that need a real completion id
        body = {"VALID": {"id": completion_id, "label": "yes"},
                "NOTE": {"id": completion_id, "label": True, "note": "n" * 5000},
                "EXTRA": {"id": completion_id, "label": True, "rating": 5}}[body]
    path = feedback_server.folder / "feedback.jsonl"
    before = path.read_bytes() if path.is_file() else b""
    response = rate(feedback_server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert (path.read_bytes() if path.is_file() else b"") == before


def test_a_reply_is_rated_once_and_only_with_the_api_key(feedback_server, client):
    completion_id = ask(client, "beta", PROMPTS[3]).id
    assert rate(feedback_server, {"id": completion_id, "label": True}, key=None).status_code == 401
    assert rate(feedback_server, {"id": completion_id, "label": True}, key="wrong").status_code == 401
    assert rate(feedback_server, {"id": completion_id, "label": True}).status_code == 200
    second = rate(feedback_server, {"id": completion_id, "label": False})
    assert second.status_code == 409 and second.json()["error"]["code"] == "already_rated"
    assert [r["id"] for r in records(feedback_server)].count(completion_id) == 1


def test_fifty_concurrent_clients_each_record_once(feedback_server, client):
    def chat_and_rate(index: int) -> str:
        prompt = PROMPTS[index % len(PROMPTS)]
        completion_id = (list(ask(client, "alpha", prompt, stream=True))[0].id if index % 3 == 0
                         else ask(client, "alpha", prompt).id)  # a stream is rated once it has ended
        response = rate(feedback_server, {"id": completion_id, "label": index % 2 == 0, "note": f"client {index}"})
        assert response.status_code == 200, response.text
        return completion_id

    before = len(records(feedback_server))
    with ThreadPoolExecutor(max_workers=50) as pool:
        ids = list(pool.map(chat_and_rate, range(50)))
    written = records(feedback_server)[before:]  # every line parses (records() would raise otherwise)
    assert sorted(r["id"] for r in written) == sorted(ids) and len(set(ids)) == 50
    assert {r["note"]: r["messages"][-1]["label"] for r in written} == {f"client {i}": i % 2 == 0 for i in range(50)}


def test_feedback_is_off_without_feedback_dir(models):  # noqa: F811
    running = RunningServer(load_config(None, models["overrides"]))
    try:
        response = httpx.post(f"{running.base_url}/feedback", json={"id": "x", "label": True},
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "feedback_off"
    finally:
        running.stop()


def test_a_torn_last_line_is_cut_by_the_server_and_skipped_by_the_reader(tmp_path, capsys):
    from prospect.data.files import read_records
    from prospect.feedback import FeedbackLog

    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b", "label": True}]})
    path = tmp_path / "feedback.jsonl"
    path.write_text(good + "\n" + good[:25])  # killed while writing the second record
    assert read_records(str(path)) == [json.loads(good)]
    assert "line 2, the last, is cut off" in capsys.readouterr().err
    FeedbackLog(tmp_path)  # the next server start removes the torn tail before appending
    assert path.read_text() == good + "\n"
    assert json.loads((tmp_path / "dataset_info.json").read_text())["feedback"]["file_name"] == "feedback.jsonl"
    path.write_text(good + "\n{broken\n" + good + "\n")  # a bad line that is not the last is still an error
    with pytest.raises(Exception, match="record 1 \\(line 2\\): invalid JSON"):
        read_records(str(path))


# --------------------------------------------------------------------------------------------------
# The chat page at `/`, in a real headless Chromium (Debian's package; .ci/run installs it)

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")
def test_the_chat_page_streams_a_reply_and_records_a_thumbs_down(feedback_server):
    from playwright.sync_api import sync_playwright

    page_url = feedback_server.base_url.removesuffix("/v1") + "/"
    before = len(records(feedback_server))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_url)
            page.fill("#key", API_KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length === 3")
            assert page.eval_on_selector_all("#model option", "options => options.map(o => o.value)") == [
                "base", "alpha", "beta"]
            page.select_option("#model", "beta")
            page.fill("#input", PROMPTS[1])
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant .rate button")  # shown once the stream has ended
            reply = page.inner_text(".assistant > span")
            assert reply.strip(), "the streamed reply is on the page"
            page.click(".assistant .rate button[data-label=false]")
            page.wait_for_selector(".rate .chosen")
            assert "recorded" in page.inner_text(".assistant .rate")
            completion_id = page.get_attribute(".assistant", "data-completion-id")
            page.fill("#input", "/reset")
            page.press("#input", "Enter")
            assert page.locator(".assistant").count() == 0
        finally:
            browser.close()
    [record] = records(feedback_server)[before:]
    assert record["id"] == completion_id and record["model"] == "beta"
    assert record["messages"] == [{"role": "user", "content": PROMPTS[1]},
                                  {"role": "assistant", "content": reply, "label": False}]
    assert all(url.startswith(page_url) for url in requests), "the page fetches nothing from elsewhere"


# --------------------------------------------------------------------------------------------------
# The loop, end to end (examples/feedback_loop.py; on a tiny random model here, the embedded one in README)


def test_the_feedback_loop_script_serves_rates_trains_and_evaluates(tmp_path, tiny_model_dir):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "examples" / "feedback_loop.py"), "--model", str(tiny_model_dir),
                           "--samples", "1", "--out", str(tmp_path / "loop")], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "loop" / "loop_results.json").read_text())
    ratings = summary["ratings"]
    assert ratings["replies"] == 121 == ratings["thumbs_up"] + ratings["thumbs_down"]
    written = (tmp_path / "loop" / "feedback" / "feedback.jsonl").read_text().splitlines()
    assert len(written) == 121 and sum(json.loads(line)["messages"][-1]["label"] for line in written) == ratings["thumbs_up"]
    assert summary["held_out"]["prompts"] == 40 and summary["general"]["prompts"] == 48
    for set_name in ("held_out", "general"):
        for side in ("base", "trained"):
            assert set(summary[set_name][side]) == {"one_sentence", "degenerate", "correct"}
    # Refuses to write over ratings a person collected.
    again = subprocess.run([sys.executable, str(root / "examples" / "feedback_loop.py"), "--model", str(tiny_model_dir),
                            "--out", str(tmp_path / "loop")], capture_output=True, text=True, cwd=str(tmp_path))
    assert again.returncode != 0 and "exists" in again.stdout + again.stderr
