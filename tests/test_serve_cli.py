"""`finetune serve` as a command: sources and their errors, the torch-free ONNX server, SIGTERM drain."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from conftest import make_model_dir, run_cli
from serve_helpers import ServerProcess

openai = pytest.importorskip("openai")

PROMPT = "Title: Lemon"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve-cli") / "tiny", dropout=False)


@pytest.fixture(scope="module")
def onnx_dir(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-cli-onnx") / "tiny-onnx"
    run_cli("export", "--checkpoint", model_dir, "--format", "onnx", "--output", out)
    return out


@pytest.fixture(scope="module")
def onnx_server(onnx_dir):
    """The ONNX server in a process where importing torch, transformers or accelerate fails."""
    process = ServerProcess("--onnx", onnx_dir, "--max-batch-size", "4", block_torch=True)
    yield process
    assert process.stop() == 0, process.log
    assert "Traceback" not in process.log, process.log


def serve_error(*args: str, env: dict | None = None) -> str:
    """`finetune serve ARGS` that must fail before serving: exit 2, one line."""
    import os

    command = [sys.executable, "-m", "finetune", "serve", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_onnx_serving_imports_no_torch_and_matches_torch_greedy(onnx_server, model_dir):
    from finetune.api import generate

    assert "(onnx backend)" in onnx_server.log and "'tiny-onnx'" in onnx_server.log
    client = openai.OpenAI(base_url=f"{onnx_server.url}/v1", api_key="anything", max_retries=0)
    out = client.completions.create(model="tiny-onnx", prompt=PROMPT, max_tokens=16, temperature=0)
    expected = generate(PROMPT, model=str(model_dir), temperature=0, max_new_tokens=16, include_prompt=False)[0]
    assert out.choices[0].text == expected
    batch = client.completions.create(
        model="tiny-onnx", prompt=[PROMPT, "Serves", PROMPT], max_tokens=16, temperature=0
    )
    assert batch.choices[0].text == batch.choices[2].text == expected  # batched greedy == alone


def test_chat_on_a_plain_text_model_says_to_use_completions(onnx_server):
    response = httpx.post(
        f"{onnx_server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "/v1/completions" in error["message"] and error["param"] == "messages"


def test_sigterm_drains_in_flight_requests_and_exits_0(onnx_dir):
    server = ServerProcess("--onnx", onnx_dir, block_torch=True)
    body = {
        "prompt": PROMPT,
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks: list[dict] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    server.process.send_signal(signal.SIGTERM)
    reader.join(60)
    assert server.stop() == 0, server.log
    assert chunks[-1] == "[DONE]"
    usage = json.loads(chunks[-2])["usage"]
    finish = [json.loads(c)["choices"][0]["finish_reason"] for c in chunks[:-2]][-1]
    assert finish in ("length", "stop") and usage["completion_tokens"] >= 1
    assert "server stopped" in server.log and "Traceback" not in server.log


def test_bad_sources_fail_in_one_line_before_the_server_starts(tmp_path, model_dir, onnx_dir):
    assert "no run named 'nope'" in serve_error("--run", "nope", "--runs-dir", tmp_path)
    assert "no trained runs" in serve_error("--runs-dir", tmp_path / "empty")
    assert "does not exist" in serve_error("--checkpoint", tmp_path / "missing")
    assert "--onnx alone" in serve_error("--onnx", onnx_dir, "--model", model_dir)
    assert "--max-batch-size" in serve_error("--model", model_dir, "--max-batch-size", "0", "--port", "0")
    assert "--top-p" in serve_error("--model", model_dir, "--top-p", "0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in serve_error("--model", model_dir, "--port", port)
    # Nothing listens there: one line in seconds, before Ray is imported (ray.init would retry for minutes)
    replicas = ("--model", model_dir, "--replicas", "2", "--ray-address")
    assert "cannot reach the Ray cluster at --ray-address" in serve_error(*replicas, f"127.0.0.1:{port}")
    assert "expected HOST:PORT" in serve_error(*replicas, "nowhere")


def test_a_missing_serve_extra_is_one_line_naming_the_extra(model_dir):
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = None\n"
        "from finetune.cli import main\n"
        f"main(['serve', '--model', {str(model_dir)!r}, '--port', '0'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[serve]" in lines[0] and "pip install" in lines[0], result.stderr


def test_the_model_name_is_the_runs_name():
    from finetune.serving.server import source_name

    assert source_name("recipes", "runs/recipes/checkpoint-000200") == "recipes"
    assert source_name(None, "runs/recipes/checkpoint-000200") == "recipes"
    assert source_name(None, "exports/recipes-onnx") == "recipes-onnx"
    assert source_name(None, "gpt2") == "gpt2"


def test_a_model_that_fails_to_load_stops_the_server_with_one_line(tmp_path):
    broken = tmp_path / "broken-onnx"
    broken.mkdir()
    command = [sys.executable, "-m", "finetune", "serve", "--onnx", str(broken), "--port", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr


def test_health_and_requests_answer_503_while_the_model_loads():
    from starlette.testclient import TestClient

    from finetune.serving.http_app import create_app

    app = create_app(None, None, "loading-model")
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        response = client.post("/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "model_loading"


def test_onnx_chat_renders_the_saved_template_as_transformers_does(onnx_dir, model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from finetune.serving.codec import CHAT_TEMPLATE_FILE, onnx_codec
    from finetune.serving.onnx_backend import OnnxBackend
    from finetune.supervised import SIMPLE_CHAT_TEMPLATE

    chat_export = tmp_path / "chat-onnx"
    shutil.copytree(onnx_dir, chat_export)
    (chat_export / CHAT_TEMPLATE_FILE).write_text(SIMPLE_CHAT_TEMPLATE)
    codec = onnx_codec(OnnxBackend.load(chat_export), str(chat_export))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A soup?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert codec.chat_kind == "template"
    assert codec.chat(messages) == tokenizer(text, add_special_tokens=False)["input_ids"]
    (chat_export / CHAT_TEMPLATE_FILE).write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        onnx_codec(OnnxBackend.load(chat_export), str(chat_export)).chat(messages)


def test_chat_formats_follow_how_the_run_was_trained(tmp_path):
    from types import SimpleNamespace

    from finetune.serving.codec import ChatUnsupported, torch_codec

    def checkpoint(name: str, state: dict) -> str:
        (tmp_path / name / "training_state").mkdir(parents=True)
        (tmp_path / name / "training_state" / "state.json").write_text(json.dumps(state))
        return str(tmp_path / name)

    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    backend = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None), encode=encode)
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "Q1"},
        {"role": "user", "content": "Q2"},
    ]
    supervised = torch_codec(backend, checkpoint("pc", {"data_mode": "supervised", "chat": False}))
    assert supervised.chat_kind == "prompt" and supervised.chat(messages) == encode("Q2")
    plain = torch_codec(backend, checkpoint("plain", {"data_mode": "packed", "chat": False}))
    with pytest.raises(ChatUnsupported):
        plain.chat(messages)


def test_model_name_and_key_from_the_environment_then_ctrl_c_exits_0(onnx_dir):
    server = ServerProcess("--onnx", onnx_dir, "--model-name", "soup", block_torch=True, env={"FINETUNE_API_KEY": "k"})
    try:
        assert "serving 'soup' (onnx backend)" in server.log
        body = {"model": "soup", "prompt": PROMPT, "max_tokens": 2}
        assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 401
        ok = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200 and ok.json()["model"] == "soup"
    finally:
        assert server.stop(signal.SIGINT) == 0, server.log
    assert "server stopped" in server.log and "aborted" not in server.log


@pytest.mark.slow
def test_a_burst_of_200_requests_at_32_clients_loses_none(onnx_dir):
    """Every request gets a whole answer or a 429; the server stays up and healthy, and its memory goes back to
    where it was after a warm-up of the same load (a leak per request would add megabytes over 200)."""
    from concurrent.futures import ThreadPoolExecutor

    server = ServerProcess("--onnx", onnx_dir, "--max-batch-size", "16", "--max-queue", "8", block_torch=True)
    body = {"prompt": PROMPT, "max_tokens": 32, "temperature": 0, "stream": True}

    def one(_) -> str:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
            if response.status_code != 200:
                return str(response.status_code)
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            finish = json.loads(lines[-2][6:])["choices"][0]["finish_reason"]
            return f"200 {finish} {lines[-1]}"

    try:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(one, range(32)))  # warm-up: allocator pools and ONNX Runtime's arenas reach their size
            idle = server.rss_mb()
            outcomes = list(pool.map(one, range(200)))
        assert httpx.get(f"{server.url}/health").status_code == 200
        after = server.rss_mb()
        assert after <= idle * 1.05 + 8, f"memory after the burst {after:.0f} MB, idle {idle:.0f} MB"
    finally:
        assert server.stop() == 0, server.log
    complete = [o for o in outcomes if o.startswith("200")]
    assert all(o in ("200 length data: [DONE]", "200 stop data: [DONE]") for o in complete), set(outcomes)
    assert len(complete) + outcomes.count("429") == 200, set(outcomes)
    assert "Traceback" not in server.log


def test_a_chat_run_serves_chat_as_finetune_generate_samples_it_torch_and_onnx(tmp_path):
    """A run trained on chat data: served by name with its saved template; the ONNX export renders it the same."""
    from finetune.api import generate

    dishes = ["lemon", "carrot", "leek", "pea", "bean", "corn", "kale", "onion"] * 6
    rows = [
        {"messages": [{"role": "user", "content": f"A dish with {x}?"}, {"role": "assistant", "content": f"{x} soup."}]}
        for x in dishes
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    runs = tmp_path / "runs"
    run_cli("train", data, "--model", "tiny", "--steps", "4", "--runs-dir", runs, "--run-name", "chatty")
    onnx = tmp_path / "chatty-onnx"
    run_cli("export", "--run", "chatty", "--runs-dir", runs, "--format", "onnx", "--output", onnx)
    question = "A dish with leek?"
    greedy = dict(temperature=0, max_new_tokens=8, include_prompt=False)
    expected = generate(question, run="chatty", runs_dir=str(runs), **greedy)
    assert expected[0], "the run ended its answer at once: nothing to compare"
    messages = [{"role": "user", "content": question}]
    for args, name in ((("--run", "chatty", "--runs-dir", runs), "chatty"), (("--onnx", onnx), "chatty-onnx")):
        server = ServerProcess(*args, block_torch=args[0] == "--onnx")
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
            out = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
            assert out.choices[0].message.content == expected[0], (name, server.log)
        finally:
            assert server.stop() == 0, server.log


def test_sampling_defaults_follow_the_models_generation_config_unless_a_flag_says(onnx_dir, tmp_path):
    """A model that asks for greedy decoding and 5 new tokens gets them; a flag wins; a value serve cannot use
    is one line naming the file."""
    model = tmp_path / "greedy-onnx"
    shutil.copytree(onnx_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 5}))
    for flags, tokens in (((), 5), (("--max-tokens", "3"), 3)):
        server = ServerProcess("--onnx", model, *flags, block_torch=True)
        try:
            assert f"max_tokens {tokens}, temperature 0.0, top_k 50, top_p 0.95" in server.log
            answers = [httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT}).json() for _ in range(2)]
        finally:
            assert server.stop() == 0, server.log
        assert answers[0]["usage"]["completion_tokens"] == tokens, answers
        assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]  # greedy: the same twice
    (model / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    line = serve_error("--onnx", model, "--port", "0")
    assert "generation_config.json recommends" in line and "--top-p must be in (0, 1]" in line, line
    (model / "generation_config.json").write_text('{"top_p": 0.9')  # cut short
    line = serve_error("--onnx", model, "--port", "0")
    assert "generation config" in line and "is not valid JSON" in line, line
