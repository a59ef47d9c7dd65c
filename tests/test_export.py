"""`finetune export` (safetensors and ONNX) and `finetune generate --onnx`, through the CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model_dir, run_cli

from finetune import onnx_quantize
from finetune.architectures import onnx_architectures

ARCHITECTURES = onnx_architectures()  # each one the table claims is exported, verified and sampled
STANDARD_DOMAINS = ("", "ai.onnx")


def graph_ops(directory: Path) -> dict[str, str]:
    """operator type -> domain for every node of an exported graph."""
    import onnx

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    return {node.op_type: node.domain for node in graph.node}


def greedy_text(*source_args: str, prompt: str = "Title: Lemon", tokens: int = 24) -> str:
    return run_cli(
        "generate",
        *source_args,
        "--prompt",
        prompt,
        "--prompt",
        "Serves",
        "--temperature",
        0,
        "--max-new-tokens",
        tokens,
        "--batch-size",
        2,
    ).stdout


# Mistral and Qwen2 are Llama's graph with small changes (a sliding window, q/k/v biases): 20 s, in the slow suite.
SLOW_EXPORTS = {"mistral", "qwen2"}
# Exports whose attention becomes GroupQueryAttention. Llama's family concatenates the cache outside the fused
# attention (its keys and values have fewer heads), and Mistral's config sets a sliding window.
SHARED_KV = {"gpt2"}


@pytest.mark.parametrize(
    "architecture",
    [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_EXPORTS else a for a in ARCHITECTURES],
)
def test_onnx_export_parity_and_greedy_equality(workdir, architecture):
    model_dir = make_model_dir(workdir / architecture, architecture)
    out = workdir / "onnx"
    result = run_cli("export", "--checkpoint", model_dir, "--format", "onnx", "--output", out)
    assert "verification:" in result.output
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and report["greedy_identical"] and report["greedy_left_padding"]
    assert report["prompt_max_abs_logit_diff"] < 1e-3 and report["decode_step_max_abs_logit_diff"] < 1e-3
    manifest = json.loads((out / "finetune_onnx.json").read_text())
    assert manifest["model_type"] == architecture and manifest["opset"] >= 17
    names = [i["name"] for i in manifest["inputs"]]
    assert manifest["outputs"][1]["name"] == "present.0.key" and manifest["eos_token_id"] == 0
    # By default attention runs as one ONNX Runtime operator per layer. Where the fusion puts the KV cache
    # inside it and the attention has no sliding window, that is GroupQueryAttention, its cache written in place.
    ops = graph_ops(out)
    assert manifest["kv_cache"] == ("shared" if architecture in SHARED_KV else "concat")
    if manifest["kv_cache"] == "concat":
        assert ops.get("MultiHeadAttention") == "com.microsoft"
        assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3] == "past_key_values.0.key"
    else:
        assert manifest["kv_cache"] == "shared" and ops.get("GroupQueryAttention") == "com.microsoft"
        assert "MultiHeadAttention" not in ops and "attention_mask" not in names
        assert names[:5] == ["input_ids", "position_ids", "seqlens_k", "total_sequence_length", "logits_positions"]
        assert names[5] == "past_key_values.0.key" and ops.get("GatherND") == ""  # logits at chosen rows only
    assert manifest["onnxruntime_fusions"]
    assert "needs ONNX Runtime" in (out / "README.md").read_text()
    for name in ("tokenizer.json", "README.md", "model.onnx", "generation_config.json"):
        assert (out / name).is_file(), name
    # ONNX Runtime generation gives the torch path's greedy text, batch of 2 with left padding.
    assert greedy_text("--onnx", out) == greedy_text("--checkpoint", model_dir)


def test_onnx_graph_has_dynamic_batch_sequence_and_past(workdir, gpt2_dir):
    import onnx

    run_cli("export", "--checkpoint", gpt2_dir, "--format", "onnx", "--output", workdir / "o", "--no-verify")
    graph = onnx.load(str(workdir / "o" / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.1.value"][0] == "batch" and dims["past_key_values.1.value"][2] == "past_sequence"
    assert dims["seqlens_k"] == ["batch"] and dims["total_sequence_length"] == []
    assert dims["logits_positions"] == ["batch", "outputs"]
    assert not (workdir / "o" / "verification.json").exists()


def test_no_optimize_keeps_standard_onnx_operators(workdir, gpt2_dir):
    for extra in ([], ["--quantize", "int8"]):
        out = workdir / ("plain-" + "-".join(extra))
        run_cli("export", "--checkpoint", gpt2_dir, "--format", "onnx", "--output", out, "--no-optimize", *extra)
        ops = graph_ops(out)
        assert set(ops.values()) <= set(STANDARD_DOMAINS), ops
        manifest = json.loads((out / "finetune_onnx.json").read_text())
        assert manifest["onnxruntime_fusions"] == {} and json.loads((out / "verification.json").read_text())["passed"]
    assert "MatMulInteger" in ops and manifest["quantization"] == onnx_quantize.DESCRIPTION
    import onnx

    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)  # valid for any ONNX runtime
    assert "needs ONNX Runtime" not in (out / "README.md").read_text()
    assert greedy_text("--onnx", workdir / "plain-") == greedy_text("--checkpoint", gpt2_dir)


def export_expecting_standard_graph(model_dir: Path, out: Path, message: str) -> Path:
    """Export with fusions on; expect `message`, a verified graph, and standard ONNX operators only."""
    result = run_cli("export", "--checkpoint", model_dir, "--format", "onnx", "--output", out)
    assert message in result.output
    assert set(graph_ops(out).values()) <= set(STANDARD_DOMAINS)
    assert json.loads((out / "verification.json").read_text())["passed"]
    return out


def test_a_failed_fusion_keeps_the_plain_graph(workdir, gpt2_dir, monkeypatch):
    from finetune import onnx_optimize

    def broken(*_args):
        raise RuntimeError("pattern matcher gave up\nsecond line")

    monkeypatch.setattr(onnx_optimize, "fuse", broken)
    out = export_expecting_standard_graph(
        gpt2_dir, workdir / "fallback", "ONNX Runtime fusions not applied (RuntimeError: pattern matcher gave up)"
    )
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("model", "staging"))) == ["model.onnx"]


def test_a_fused_graph_that_fails_verification_is_redone_without_fusions(workdir, gpt2_dir, monkeypatch):
    from finetune import exporting

    real_verify = exporting._verify_onnx

    def fused_graphs_fail(model, tokenizer, directory, dtype, quantize):
        report = real_verify(model, tokenizer, directory, dtype, quantize)
        fused = json.loads((directory / "finetune_onnx.json").read_text())["onnxruntime_fusions"]
        return {**report, "passed": report["passed"] and not fused}

    monkeypatch.setattr(exporting, "_verify_onnx", fused_graphs_fail)
    export_expecting_standard_graph(
        gpt2_dir,
        workdir / "redone",
        "the fused graph failed verification; exporting again with standard ONNX operators",
    )


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8"]])
def test_external_data_exports(workdir, gpt2_dir, monkeypatch, extra):
    """Models over 2 GB keep their weights beside the graph; forced here with a zero threshold."""
    from finetune import exporting

    monkeypatch.setattr(exporting, "EXTERNAL_DATA_BYTES", 0)
    out = workdir / "external"
    run_cli("export", "--checkpoint", gpt2_dir, "--format", "onnx", "--output", out, *extra)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model")) == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    assert json.loads((out / "verification.json").read_text())["passed"]


def test_int8_and_fp16_exports_of_a_trained_run(trained_run, trained_onnx, workdir):
    runs = trained_run.parent
    run_cli(
        "export",
        "--runs-dir",
        runs,
        "--run",
        "recipes",
        "--format",
        "onnx",
        "--quantize",
        "int8",
        "--output",
        workdir / "int8",
    )
    assert graph_ops(workdir / "int8")["MatMulInteger"] in STANDARD_DOMAINS
    manifest = json.loads((workdir / "int8" / "finetune_onnx.json").read_text())
    assert manifest["quantization"] == onnx_quantize.DESCRIPTION
    report = json.loads((workdir / "int8" / "verification.json").read_text())
    assert report["weights"] == "int8" and report["passed"]
    assert 0 <= report["greedy_token_agreement"] <= 1 and report["prompt_top1_agreement"] >= 0.8
    assert (workdir / "int8" / "model.onnx").stat().st_size < 0.4 * (trained_onnx / "model.onnx").stat().st_size
    import onnx

    vocab = json.loads((workdir / "int8" / "finetune_onnx.json").read_text())["vocab_size"]
    # The token table (vocab x width) is stored in int8, with one float scale per row.
    width = json.loads((workdir / "int8" / "config.json").read_text())["n_embd"]
    tables = {
        t.data_type
        for t in onnx.load(str(workdir / "int8" / "model.onnx")).graph.initializer
        if list(t.dims) == [vocab, width]
    }
    assert tables == {onnx.TensorProto.INT8}, tables
    out = run_cli(
        "generate", "--onnx", workdir / "int8", "--prompt", "Title:", "--max-new-tokens", 10, "--seed", 1
    ).stdout
    assert out.startswith("Title:")
    run_cli("export", "--runs-dir", runs, "--format", "onnx", "--dtype", "fp16", "--output", workdir / "fp16")
    assert json.loads((workdir / "fp16" / "finetune_onnx.json").read_text())["inputs"][3]["dtype"] == "float16"
    assert json.loads((workdir / "fp16" / "verification.json").read_text())["passed"]


@pytest.fixture(scope="module")
def trained_onnx(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "recipes-onnx"
    run_cli("export", "--runs-dir", trained_run.parent, "--format", "onnx", "--output", out)
    return out


def test_onnx_generation_options(trained_run, trained_onnx, workdir):
    out = trained_onnx
    base = ["generate", "--onnx", out, "--prompt", "Title:", "--max-new-tokens", 30]
    seeded = [*base, "--n", 3, "--seed", 5]
    assert run_cli(*seeded).stdout == run_cli(*seeded).stdout
    assert len(run_cli(*seeded).stdout.split("====================\n")[:-1]) == 3
    stopped = run_cli(*base, "--temperature", 0, "--stop", "\n", "--no-stream").stdout
    assert stopped.split("====================")[0].count("\n") == 1
    torch_stopped = run_cli(
        "generate",
        "--runs-dir",
        trained_run.parent,
        "--prompt",
        "Title:",
        "--max-new-tokens",
        30,
        "--temperature",
        0,
        "--stop",
        "Serves",
    ).stdout
    assert run_cli(*base, "--temperature", 0, "--stop", "Serves").stdout == torch_stopped  # streamed, stop respected
    no_prompt = run_cli(*base, "--temperature", 0, "--no-include-prompt", "--no-stream").stdout
    assert not no_prompt.startswith("Title:")
    run_cli(*base, "--n", 2, "--seed", 1, "--output", workdir / "s.txt")
    assert (workdir / "s.txt").read_text().count("====================\n") == 2
    penalised = run_cli(*base, "--temperature", 0, "--repetition-penalty", 1.3, "--no-stream").stdout
    torch_penalised = run_cli(
        "generate",
        "--runs-dir",
        trained_run.parent,
        "--prompt",
        "Title:",
        "--max-new-tokens",
        30,
        "--temperature",
        0,
        "--repetition-penalty",
        1.3,
        "--no-stream",
    ).stdout
    assert penalised == torch_penalised


def test_onnx_generation_runs_without_torch(trained_run, trained_onnx):
    out = trained_onnx
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'accelerate'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "from finetune.cli import main\n"
        f"main(['generate', '--onnx', {str(out)!r}, '--prompt', 'Title:', "
        "'--temperature', '0', '--max-new-tokens', '20'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = run_cli(
        "generate", "--runs-dir", trained_run.parent, "--prompt", "Title:", "--temperature", 0, "--max-new-tokens", 20
    ).stdout
    assert result.stdout == expected


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_safetensors_export_is_a_clean_hf_directory(trained_run, workdir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = workdir / "hf"
    run_cli("export", "--runs-dir", trained_run.parent, "--run", "recipes", "--output", out)
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= set(names)
    assert "training_state" not in names
    # Every file readable by a server running as another user, in the export and in the checkpoint
    # (safetensors writes model.safetensors through a private 0600 temporary file).
    mode = 0o666 & ~_umask()
    written = [*out.iterdir(), *(trained_run / "checkpoint-000060").rglob("*")]
    assert {
        p.name: oct(stat.S_IMODE(p.stat().st_mode))
        for p in written
        if p.is_file() and stat.S_IMODE(p.stat().st_mode) != mode
    } == {}
    card = (out / "README.md").read_text()
    assert "| base model | `tiny` |" in card and "| steps | 60 |" in card and "final validation loss" in card
    assert "recipes.txt" in card and "finetune train" in card and "from_pretrained" in card
    assert "https://pypi.org/project/finetune-lm/" in card  # "finetune" there is an unrelated project
    model = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(trained_run / "checkpoint-000060")
    ids = AutoTokenizer.from_pretrained(out)("Title:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    run_cli("export", "--runs-dir", trained_run.parent, "--dtype", "fp16", "--output", workdir / "hf16")
    assert json.loads((workdir / "hf16" / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "nope"], "no run named 'nope'"),
        (["--checkpoint", "missing"], "checkpoint directory 'missing' does not exist"),
        (["--format", "gguf"], "Invalid value for '--format'"),
        (["--quantize", "int8"], "--quantize int8 applies to --format onnx only"),
        (["--format", "onnx", "--dtype", "bf16"], "ONNX export supports --dtype fp32 or fp16"),
    ],
)
def test_export_errors(trained_run, workdir, args, message):
    result = run_cli("export", "--runs-dir", trained_run.parent, *args, expect=2)
    assert message in result.output and "Traceback" not in result.output


def test_export_refuses_to_overwrite_and_needs_checkpoints(trained_run, workdir):
    (workdir / "taken").mkdir()
    (workdir / "taken" / "keep.txt").write_text("mine")
    result = run_cli("export", "--runs-dir", trained_run.parent, "--output", workdir / "taken", expect=2)
    assert "already exists and is not empty" in result.output
    assert (workdir / "taken" / "keep.txt").read_text() == "mine"
    (workdir / "runs" / "empty").mkdir(parents=True)
    result = run_cli("export", "--run", "empty", expect=2)
    assert "run 'empty' has no checkpoint yet" in result.output


def test_unsupported_architecture_and_missing_onnx(workdir, monkeypatch):
    opt = make_model_dir(workdir / "opt", "opt")
    result = run_cli("export", "--checkpoint", opt, "--format", "onnx", expect=2)
    assert "does not handle 'opt' models yet" in result.output and "--format safetensors" in result.output
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    result = run_cli("export", "--checkpoint", opt, "--format", "onnx", expect=2)
    assert (
        "ONNX export needs onnxscript; install them with: pip install " in result.output and "[onnx]'" in result.output
    )


def test_onnx_dir_errors(workdir):
    (workdir / "notonnx").mkdir()
    result = run_cli("generate", "--onnx", workdir / "notonnx", expect=2)
    assert "is not a finetune ONNX export" in result.output
