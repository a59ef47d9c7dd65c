"""`finetune serve --replicas 2`: the same app on Ray Serve, two replicas on a local Ray instance (slow: Ray starts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model_dir
from serve_helpers import ServerProcess

openai = pytest.importorskip("openai")

PROMPTS = ["Title: Lemon", "Serves", "Title: Bread", "Ingredients:"]


def test_a_missing_ray_extra_is_one_line_naming_the_extra(tmp_path):
    model = make_model_dir(tmp_path / "tiny", dropout=False)
    code = "import sys\nsys.modules['ray'] = None\nfrom finetune.cli import main\nmain()\n"
    command = [sys.executable, "-c", code, "serve", "--model", str(model), "--replicas", "2", "--port", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[ray]" in lines[0] and "pip install" in lines[0], result.stderr


def test_without_replicas_nothing_imports_ray():
    code = (
        "import sys\n"
        "import finetune.cli, finetune.serving.launch, finetune.serving.ray_replicas, finetune.serving.http_app\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ray_flags_need_replicas(tmp_path):
    model = make_model_dir(tmp_path / "tiny", dropout=False)
    command = [sys.executable, "-m", "finetune", "serve", "--model", str(model), "--ray-address", "auto"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--replicas" in result.stderr, result.stderr


def _descendants(pid: int) -> list[int]:
    """Every process below pid (Ray's GCS, raylet, proxy and replica workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_two_ray_serve_replicas_answer_as_one_server_does_then_sigterm_stops_ray(tmp_path):
    pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'finetune-lm[ray]')")
    from finetune.api import generate

    model = make_model_dir(tmp_path / "tiny", dropout=False)
    server = ServerProcess("--model", model, "--replicas", "2", "--host", "127.0.0.1", timeout=300)
    try:
        ray_processes = _descendants(server.process.pid)
        assert ray_processes, "no Ray processes under the server"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)
        expected = {
            p: generate(p, model=str(model), temperature=0, max_new_tokens=12, include_prompt=False)[0] for p in PROMPTS
        }
        replicas = set()
        for _ in range(4):
            for prompt in PROMPTS:
                raw = client.completions.with_raw_response.create(
                    model="tiny", prompt=prompt, max_tokens=12, temperature=0
                )
                replicas.add(raw.headers["x-finetune-replica"])  # added by ray_replicas.ReplicaHeader
                assert raw.parse().choices[0].text == expected[prompt]  # greedy: as `finetune generate` gives it
        assert len(replicas) == 2, replicas  # Serve spread the requests over both replicas
        with pytest.raises(openai.NotFoundError):  # the same app's errors: an unknown model is a 404
            client.completions.create(model="other", prompt="x", max_tokens=2)
    finally:
        code = server.stop(timeout=120)
    assert code == 0, server.log
    assert "server stopped" in server.log, server.log
    left = [pid for pid in ray_processes if _alive(pid)]
    assert not left, f"Ray processes left after SIGTERM: {left}\n{server.log}"


def test_max_replicas_makes_an_autoscaling_deployment_sized_to_the_engine():
    serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'finetune-lm[ray]')")
    from finetune.serving.ray_replicas import ReplicaSpec, deployment
    from finetune.serving.server import Source

    spec = ReplicaSpec(Source("torch", "/m", "m"), None, 16, 0.0, 0, 1.0, 8, 64, 5.0, False)
    fixed = deployment(serve, spec, 2, 2)
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None
    scaled = deployment(serve, spec, 2, 6)._deployment_config
    assert (scaled.autoscaling_config.min_replicas, scaled.autoscaling_config.max_replicas) == (2, 6)
    assert scaled.max_ongoing_requests == 8 + 64  # Serve's default (5) would starve the batch


@pytest.mark.slow
def test_onnx_replicas_with_an_api_key_drain_a_stream_on_sigterm(tmp_path):
    """--onnx and --api-key reach every replica; SIGTERM lets a stream in flight finish, then exits 0."""
    import json
    import signal
    import threading

    import httpx

    pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'finetune-lm[ray]')")
    from conftest import run_cli

    model = make_model_dir(tmp_path / "tiny", dropout=False)
    onnx = tmp_path / "tiny-onnx"
    run_cli("export", "--checkpoint", model, "--format", "onnx", "--output", onnx)
    server = ServerProcess("--onnx", onnx, "--replicas", "2", "--api-key", "sesame", timeout=300)
    chunks: list[str] = []
    first = threading.Event()
    body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True}

    def stream() -> None:
        headers = {"Authorization": "Bearer sesame"}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    first.set()

    try:
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 401
        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(120), server.log
        server.process.send_signal(signal.SIGTERM)
        reader.join(120)
        server.process.wait(120)  # one SIGTERM: a second one (as stop() sends) would force the exit
    finally:
        code = server.stop(timeout=120)
    assert code == 0, server.log
    assert chunks[-1] == "[DONE]", chunks[-3:]
    assert json.loads(chunks[-2])["choices"][0]["finish_reason"] in ("length", "stop")
    assert "server stopped" in server.log and "Traceback" not in server.log, server.log
