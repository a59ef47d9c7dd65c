"""`finetune serve` over HTTP (torch backend): the OpenAI client and raw HTTP against a real uvicorn subprocess."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_model_dir
from serve_helpers import ServerProcess

openai = pytest.importorskip("openai")

KEY = "test-key"
PROMPT = "Title: Lemon"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 whose tokenizer carries the chat template finetune saves with chat runs."""
    from transformers import AutoTokenizer

    from finetune.supervised import SIMPLE_CHAT_TEMPLATE

    path = make_model_dir(tmp_path_factory.mktemp("serve-api") / "tiny-chat", dropout=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(chat_model):
    process = ServerProcess(
        "--model", chat_model, "--api-key", KEY, "--max-batch-size", "2", "--max-queue", "6", "--temperature", "0"
    )
    yield process
    code = process.stop()
    assert code == 0, process.log
    assert "Traceback" not in process.log, process.log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, **{"timeout": 60, **kwargs})


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_banner_health_and_models(server, client):
    assert re.search(r"serving 'tiny-chat' \(torch backend\) at http://127\.0\.0\.1:\d+/v1", server.log)
    assert "try: curl " in server.log and "Authorization: Bearer" in server.log
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


def test_greedy_completion_equals_finetune_generate(client, chat_model):
    from finetune.api import generate

    expected = generate(PROMPT, model=str(chat_model), temperature=0, max_new_tokens=12, include_prompt=False)[0]
    out = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_without_max_tokens_a_long_prompt_gets_what_the_context_leaves(server):
    response = post(server, "/v1/completions", {"prompt": [5] * 250, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 256 - 250


def test_several_prompts_and_n_choices(client):
    out = client.completions.create(
        model="tiny-chat", prompt=[PROMPT, "Serves 4"], max_tokens=4, n=3, temperature=1.0, seed=3
    )
    assert [c.index for c in out.choices] == list(range(6))
    assert out.usage.completion_tokens == sum(4 for _ in out.choices)


def test_streaming_with_usage_gives_the_same_text(client):
    whole = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny-chat",
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_stop_strings_cut_the_text_and_finish_with_stop(client):
    whole = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    cut = whole[: whole.find(stop)]
    stops = [stop, "z" * 200]
    out = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=20, temperature=0, stop=stops)
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny-chat", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        extra = {"top_k": 0}  # not in OpenAI's API: the client sends it as an extra field
        out = client.completions.create(
            model="tiny-chat", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=1.0, seed=seed, extra_body=extra
        )
        return out.choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_echo_logprobs_score_the_prompt_as_lm_eval_asks(client):
    out = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    logprobs = out.choices[0].logprobs
    assert out.choices[0].text == PROMPT
    n = out.usage.prompt_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == n
    assert logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.top_logprobs[0] is None and all(len(t) == 1 for t in logprobs.top_logprobs[1:])
    assert logprobs.text_offset == sorted(logprobs.text_offset) and "".join(logprobs.tokens) == PROMPT
    generated = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=3, logprobs=2, temperature=0)
    lp = generated.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == generated.choices[0].text


def test_chat_uses_the_saved_template_and_streams(client, chat_model):
    from finetune.api import generate

    expected = generate("Hi", model=str(chat_model), temperature=0, max_new_tokens=8, include_prompt=False)
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8
    plain = client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=8, temperature=0)
    assert out.usage.prompt_tokens > plain.usage.prompt_tokens  # the template wrapped the message
    assert expected[0] != "" and isinstance(out.choices[0].message.content, str)
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=messages,
            max_completion_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "top_p": 2}, "top_p"),
        ({"prompt": "x", "n": 10**9}, "n"),
        ({"prompt": "x", "logprobs": 99}, "logprobs"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[10**9]]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": ["a", "b", "c"], "n": 3}, "n"),
        ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
        ({"prompt": "x", "stop": [1]}, "stop"),
    ],
)
def test_bad_fields_are_400_naming_the_field(server, body, param):
    assert error_of(post(server, "/v1/completions", body), 400)["param"] == param


def test_every_refusal_has_openais_shape_and_the_server_keeps_serving(server):
    assert error_of(post(server, "/v1/completions", {"prompt": "x"}, key=None), 401)["code"] == "invalid_api_key"
    assert error_of(post(server, "/v1/completions", {"prompt": "x"}, key="wrong"), 401)
    assert error_of(post(server, "/v1/completions", {"prompt": "x", "model": "gpt-4"}), 404)["param"] == "model"
    assert "JSON" in error_of(post(server, "/v1/completions", b"{not json"), 400)["message"]
    assert error_of(post(server, "/v1/completions", b"[1, 2]"), 400)
    assert error_of(post(server, "/v1/completions", b"\xff\xfe"), 400)
    too_long = error_of(post(server, "/v1/completions", {"prompt": "word " * 400, "max_tokens": 4}), 400)
    assert "context of 256 tokens" in too_long["message"] and too_long["code"] == "context_length_exceeded"
    big = error_of(post(server, "/v1/completions", {"prompt": "x" * (5 * 1024 * 1024)}), 413)
    assert "larger than" in big["message"]
    assert error_of(post(server, "/v1/chat/completions", {"messages": []}), 400)["param"] == "messages"
    assert error_of(post(server, "/v1/chat/completions", {"messages": [{"content": "x"}]}), 400)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert error_of(httpx.get(f"{server.url}/v1/nothing", headers=auth), 404)
    assert error_of(httpx.get(f"{server.url}/nothing"), 404)
    assert error_of(httpx.get(f"{server.url}/v1/completions", headers=auth), 405)
    ok = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert "Traceback" not in server.log and " 500 " not in server.log and " 422 " not in server.log


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{re.escape(name + labels)} ([\d.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_full_queue_answers_429_with_retry_after(server):
    statuses: list[int] = []
    retry_after: list[str] = []

    def request() -> None:
        r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 100, "temperature": 0})
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry_after.append(r.headers.get("retry-after"))
            error_of(r, 429)

    threads = [threading.Thread(target=request) for _ in range(16)]  # 2 slots + 6 waiting places
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429} and retry_after and all(r == "1" for r in retry_after)
    assert metric(server, "finetune_requests_total", '{status="rejected"}') >= 1


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = metric(server, "finetune_requests_total", '{status="cancelled"}')
    body = {"prompt": PROMPT, "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 10
    while metric(server, "finetune_requests_total", '{status="cancelled"}') <= before:
        assert time.monotonic() < deadline, "the disconnected request was never cancelled"
        time.sleep(0.05)
    assert metric(server, "finetune_batch_size") == 0


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot(server):
    before = metric(server, "finetune_requests_total", '{status="cancelled"}')
    body = {"prompt": PROMPT, "max_tokens": 240, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        post(server, "/v1/completions", body, timeout=0.05)
    deadline = time.monotonic() + 10
    while metric(server, "finetune_requests_total", '{status="cancelled"}') <= before:
        assert time.monotonic() < deadline, "the abandoned request was never cancelled"
        time.sleep(0.05)


def test_metrics_in_prometheus_text_format(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "finetune_requests_total",
        "finetune_prompt_tokens_total",
        "finetune_completion_tokens_total",
        "finetune_queue_depth",
        "finetune_batch_size",
        "finetune_time_to_first_token_seconds_bucket",
        "finetune_time_per_output_token_seconds_bucket",
    ):
        assert name in text
    assert metric(server, "finetune_completion_tokens_total") > 0


def test_lm_eval_local_completions_request_shape(server):
    """What lm-eval's local-completions sends for loglikelihood: token-id prompts, echo, max_tokens 1, logprobs 1."""
    prompts = [[10, 20, 30, 40], [7, 8, 9]]
    body = {"model": "tiny-chat", "prompt": prompts, "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0}
    choices = post(server, "/v1/completions", {**body, "seed": 1234}).json()["choices"]
    scored = post(server, "/v1/completions", {**body, "max_tokens": 0}).json()["choices"]
    for prompt, choice, alone in zip(prompts, choices, scored):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(prompt) + 1 and logprobs["token_logprobs"][0] is None
        assert logprobs["token_logprobs"][: len(prompt)] == alone["logprobs"]["token_logprobs"]
        assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])
