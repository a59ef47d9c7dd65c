"""Export a checkpoint for serving: a clean Hugging Face safetensors directory, or ONNX with a KV cache.

ONNX path: `torch.onnx.export(dynamo=True)` on a wrapper that takes the past key/values as flat
tensors and rebuilds a `DynamicCache` inside (transformers 5 has no legacy tuple caches). One graph
serves both the prompt (past length 0) and each decode step. Every export is verified against
PyTorch and the numbers are written next to the model (verification.json).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from finetune import onnx_optimize, onnx_quantize, output_dirs
from finetune.architectures import architecture, onnx_architectures
from finetune.errors import FinetuneError, install_hint
from finetune.files import writing
from finetune.model_card import model_card

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ONNX_FILE = "model.onnx"
MANIFEST = "finetune_onnx.json"  # names the graph's inputs, outputs and special tokens; marks an ONNX export
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with headroom for the graph itself
OPSET = 18
VERIFY_PROMPTS = ("Title: Lemon and garlic chicken\nServes: 4", "Once upon a time")
GREEDY_STEPS = 32
# Verification thresholds per weight format. fp32 must match PyTorch to float rounding; fp16 and
# int8 change the numbers by design, so they are held to top-1 agreement instead (and greedy
# agreement is reported).
LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.25, "int8": None}
MIN_TOP1_AGREEMENT = {"fp32": 1.0, "fp16": 0.9, "int8": 0.8}


@dataclass
class ExportResult:
    output: Path
    verification: Optional[dict]


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise FinetuneError(f"ONNX export needs {', '.join(missing)}; install them with: {install_hint('onnx')}")


def _load_model(source: Path, dtype_name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint's model (a LoRA adapter merged into its base) and its tokenizer, every file checked."""
    import torch

    from finetune.modeling import load_model_and_tokenizer

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    model, tokenizer = load_model_and_tokenizer(str(source), dtype, finish=False)  # the tokenizer exported as trained
    return model.eval(), tokenizer


def export_safetensors(
    source: Path,
    output: Path,
    run_dir: Optional[Path],
    dtype: str = "fp32",
    overwrite: bool = False,
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> ExportResult:
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load_model(source, dtype)
    tmp = output_dirs.start_output_dir(output, overwrite)
    try:
        with writing(output, "export"):  # a full disk: one line, and the temporary directory goes
            model.save_pretrained(tmp, max_shard_size="2GB")
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(run_dir, source, "safetensors", dtype), encoding="utf-8")
            report = None
            if verify:
                reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype).eval()
                ids = torch.tensor([tokenizer(VERIFY_PROMPTS[0])["input_ids"]])
                with torch.no_grad():
                    diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
                report = {"format": "safetensors", "dtype": dtype, "max_abs_logit_diff": diff, "passed": diff == 0.0}
                (tmp / "verification.json").write_text(json.dumps(report, indent=1))
                if diff != 0.0:
                    raise FinetuneError(
                        f"the exported weights do not reproduce the checkpoint (max logit diff {diff:.2e}); "
                        "please report this"
                    )
            output_dirs.finish_output_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {source} as safetensors ({dtype}) to {output}")
    return ExportResult(output, report)


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------


def _cache_layout(model: PreTrainedModel) -> list[tuple[int, int, int]]:
    """Per-layer key/value shapes (heads, head_dim) read from one real forward pass."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
    return [(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]) for layer in out.past_key_values.layers]


def _onnx_wrapper(model: PreTrainedModel, num_layers: int) -> torch.nn.Module:
    import torch
    from transformers import DynamicCache

    class DecoderWithCache(torch.nn.Module):
        """forward(input_ids, attention_mask, position_ids, *flat_past) -> (logits, *flat_present)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)], config=self.model.config
            )
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithCache().eval()


def _io_names(num_layers: int, shared_kv: bool = False) -> tuple[list[str], list[str]]:
    from finetune.onnx_generation import CONTROL_INPUTS, present_name  # it imports this module

    # optimum's naming, so existing ONNX Runtime generation loaders recognise the graph.
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [present_name(name) for name in past]
    control = [spec[0] for spec in CONTROL_INPUTS["shared" if shared_kv else "concat"]]
    return ["input_ids", *control, *past], ["logits", *present]


def _untie_output_layer(model: PreTrainedModel) -> None:
    """Give the output layer its own copy of the embedding matrix.

    With tied weights the exported graph feeds Transpose(embedding) to the output MatMul, which is not
    a constant weight for int8 quantization to rewrite; untied, the largest MatMul is quantized too.
    """
    import torch

    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and output.weight is embedding.weight:
        output.weight = torch.nn.Parameter(embedding.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config(decoder=True).tie_word_embeddings = False


def _export_graph(model: PreTrainedModel, path: Path, layout: list[tuple[int, int, int]], external: bool) -> None:
    import logging

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x4, nothing to act on

    num_layers = len(layout)
    batch, seq, past_len = 2, 3, 4  # not 0 or 1, so no dimension is specialised to a constant
    dtype = next(model.parameters()).dtype
    past = []
    for heads, key_dim, value_dim in layout:
        past += [
            torch.zeros(batch, heads, past_len, key_dim, dtype=dtype),
            torch.zeros(batch, heads, past_len, value_dim, dtype=dtype),
        ]
    args = (
        torch.ones(batch, seq, dtype=torch.long),
        torch.ones(batch, past_len + seq, dtype=torch.long),
        torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous(),
        *past,
    )
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    dynamic = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    inputs, outputs = _io_names(num_layers)
    torch.onnx.export(
        _onnx_wrapper(model, num_layers),
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=dynamic,
        dynamo=True,
        opset_version=OPSET,
        external_data=external,
        optimize=True,
        verbose=False,
    )


def _manifest(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: list[tuple[int, int, int]],
    dtype: str,
    quantize: Optional[str],
    shared_kv: bool,
) -> dict:
    from finetune.modeling import declared_context, pad_id
    from finetune.onnx_generation import CONTROL_INPUTS

    num_layers = len(layout)
    inputs, outputs = _io_names(num_layers, shared_kv)
    float_type = "float16" if dtype == "fp16" else "float32"
    past_length = "room" if shared_kv else "past_sequence"
    present_length = "room" if shared_kv else "past_sequence + sequence"
    spec_in = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    for name, dtype_name, shape, note in CONTROL_INPUTS["shared" if shared_kv else "concat"]:
        spec_in.append({"name": name, "dtype": dtype_name, "shape": shape, "note": note})
    positions = "outputs" if shared_kv else "sequence"  # the rows of logits_positions, or every position
    spec_out = [{"name": "logits", "dtype": float_type, "shape": ["batch", positions, model.config.vocab_size]}]
    for i, (heads, key_dim, value_dim) in enumerate(layout):
        for kv, dim in (("key", key_dim), ("value", value_dim)):
            spec_in.append(
                {
                    "name": f"past_key_values.{i}.{kv}",
                    "dtype": float_type,
                    "shape": ["batch", heads, past_length, dim],
                }
            )
            spec_out.append(
                {
                    "name": f"present.{i}.{kv}",
                    "dtype": float_type,
                    "shape": ["batch", heads, present_length, dim],
                }
            )
    assert [s["name"] for s in spec_in] == inputs and [s["name"] for s in spec_out] == outputs
    return {
        "format": "finetune-onnx-decoder",
        "version": 1,
        "file": ONNX_FILE,
        "model_type": model.config.model_type,
        "opset": OPSET,
        "dtype": dtype,
        "quantize": quantize,
        "num_layers": num_layers,
        "vocab_size": model.config.vocab_size,
        "max_positions": declared_context(model.config),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_id(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "kv_cache": "shared" if shared_kv else "concat",
        "inputs": spec_in,
        "outputs": spec_out,
        "usage": USAGE_SHARED if shared_kv else USAGE_CONCAT,
    }


USAGE_CONCAT = (
    "prompt: feed empty past (past_sequence = 0); each step: feed the new token, the grown attention_mask, its "
    "position, and the previous step's present.* as past_key_values.*"
)
USAGE_SHARED = (
    "ONNX Runtime GroupQueryAttention: allocate past_key_values.* with room for the longest row, bind each "
    "present.* output to the same memory as its past input (I/O binding: written in place), right pad the "
    "prompts; each step feeds the new token, its position, seqlens_k, total_sequence_length and "
    "logits_positions (the positions whose logits to compute, 0 for a decode step)"
)


def _verify_onnx(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path, dtype: str, quantize: Optional[str]
) -> dict:
    """Logits on a padded prompt batch and on one decode step with past, then greedy decoding."""
    import numpy as np
    import torch

    from finetune.onnx_generation import OnnxCausalLM, position_ids_for

    kind = quantize or dtype
    lm = OnnxCausalLM(directory)
    reference = model.float() if dtype == "fp32" else model  # compare fp16 graphs with the fp16 model
    encoded = [tokenizer(p)["input_ids"] for p in VERIFY_PROMPTS]
    width = max(len(e) for e in encoded)
    pad = lm.pad_token_id
    ids = np.array([[pad] * (width - len(e)) + e for e in encoded], dtype=np.int64)
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], dtype=np.int64)
    positions = position_ids_for(mask, width)
    logits, past = lm.forward(ids, mask, positions, lm.empty_past(len(encoded)))
    with torch.no_grad():
        out = reference(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            use_cache=True,
        )
    ref_logits = out.logits.float().numpy()
    real = mask.astype(bool)
    prompt_diff = float(np.abs(logits.astype(np.float32) - ref_logits)[real].max())
    top1 = float((logits.argmax(-1) == ref_logits.argmax(-1))[real].mean())

    # One decode step with the past from the prompt.
    next_ids = ref_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    step_mask = np.concatenate([mask, np.ones((len(encoded), 1), np.int64)], axis=1)
    step_pos = position_ids_for(step_mask, 1)
    step_logits, _ = lm.forward(next_ids, step_mask, step_pos, past)
    with torch.no_grad():
        step_ref = (
            reference(
                input_ids=torch.from_numpy(next_ids),
                attention_mask=torch.from_numpy(step_mask),
                position_ids=torch.from_numpy(step_pos),
                past_key_values=out.past_key_values,
            )
            .logits.float()
            .numpy()
        )
    decode_diff = float(np.abs(step_logits.astype(np.float32) - step_ref).max())

    # Greedy decoding, batch 2 with left padding, against transformers' generate.
    with torch.no_grad():
        hf = reference.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=GREEDY_STEPS,
            min_new_tokens=GREEDY_STEPS,
            pad_token_id=pad,
            eos_token_id=None,
        )[:, width:].numpy()
    ours = lm.greedy(ids, mask, GREEDY_STEPS)
    greedy_agreement = float((ours == hf).mean())
    tolerance = LOGIT_TOLERANCE[kind]
    passed = top1 >= MIN_TOP1_AGREEMENT[kind] and (tolerance is None or max(prompt_diff, decode_diff) <= tolerance)
    if kind == "fp32":
        passed = passed and greedy_agreement == 1.0
    return {
        "weights": kind,
        "prompt_max_abs_logit_diff": prompt_diff,
        "decode_step_max_abs_logit_diff": decode_diff,
        "prompt_top1_agreement": top1,
        "greedy_steps": GREEDY_STEPS,
        "greedy_batch": len(encoded),
        "greedy_left_padding": True,
        "greedy_token_agreement": greedy_agreement,
        "greedy_identical": bool((ours == hf).all()),
        "logit_tolerance": tolerance,
        "min_top1_agreement": MIN_TOP1_AGREEMENT[kind],
        "passed": bool(passed),
    }


class _FusedGraphMismatch(Exception):
    """The fused graph failed verification; the export is redone with standard operators."""


def export_onnx(
    source: Path,
    output: Path,
    run_dir: Optional[Path],
    dtype: str = "fp32",
    quantize: Optional[str] = None,
    overwrite: bool = False,
    verify: bool = True,
    log: Callable[[str], None] = print,
    optimize: bool = True,
) -> ExportResult:
    try:
        return _export_onnx(source, output, run_dir, dtype, quantize, overwrite, verify, log, optimize)
    except _FusedGraphMismatch:
        # A fusion pattern that matched but computes something else (a new architecture variant):
        # the standard graph is slower but exact, so the user still gets a working export.
        log("the fused graph failed verification; exporting again with standard ONNX operators (--no-optimize)")
        return _export_onnx(source, output, run_dir, dtype, quantize, overwrite, verify, log, optimize=False)


def _check_onnx_request(dtype: str, quantize: Optional[str]) -> None:
    _require_onnx()
    if dtype == "bf16":
        raise FinetuneError(
            "ONNX export supports --dtype fp32 or fp16 (ONNX Runtime has no bf16 kernels on CPU); "
            "use fp16 for GPU serving"
        )
    if quantize and dtype != "fp32":
        raise FinetuneError("--quantize int8 starts from fp32 weights; drop --dtype fp16")


def _require_onnx_architecture(model_type: str) -> None:
    if not architecture(model_type).onnx:
        raise FinetuneError(
            f"the ONNX exporter does not handle '{model_type}' models yet "
            f"(supported: {', '.join(onnx_architectures())}); export --format safetensors instead"
        )


def _fuse(
    graph: Path, staging: Path, external: bool, shared_kv: bool, log: Callable[[str], None]
) -> tuple[Path, dict[str, int]]:
    """The graph with ONNX Runtime's fused operators and the fusion counts; the plain graph where fusing fails."""
    fused = staging / "fused" / ONNX_FILE
    fused.parent.mkdir()
    try:
        fusions = onnx_optimize.fuse(graph, fused, external, shared_kv)
    except OSError:  # a full disk is not a fusion problem
        raise
    except Exception as exc:  # the plain graph is correct, only slower: keep it and say why
        log(
            f"ONNX Runtime fusions not applied ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            f"the graph keeps standard ONNX operators"
        )
        return graph, {}
    log("ONNX Runtime fusions: " + ", ".join(f"{name} x{count}" for name, count in fusions.items()))
    return fused, fusions


def _write_weights(
    graph: Path, directory: Path, quantize: Optional[str], external: bool, log: Callable[[str], None]
) -> Optional[str]:
    """The final graph in `directory`, its weights quantized if asked; returns how they were quantized."""
    if not quantize:
        onnx_optimize.move_graph(graph, directory)
        return None
    log("quantizing the weights to int8 ...")
    onnx_quantize.quantize_int8(graph, directory / ONNX_FILE, external)
    return onnx_quantize.DESCRIPTION


def _verify_export(
    source: Path,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    dtype: str,
    quantize: Optional[str],
    fused: bool,
    seconds: float,
    log: Callable[[str], None],
) -> dict:
    """The parity report (verification.json) against the checkpoint as transformers loads it; raises if it fails."""
    log("verifying the graph against PyTorch (logits and greedy tokens) ...")
    reference, _ = _load_model(source, dtype)
    report = _verify_onnx(reference, tokenizer, directory, dtype, quantize)
    report["export_seconds"] = round(seconds, 2)
    (directory / "verification.json").write_text(json.dumps(report, indent=1))
    log(
        f"verification: logits max |diff| {report['prompt_max_abs_logit_diff']:.2e} (prompt), "
        f"{report['decode_step_max_abs_logit_diff']:.2e} (decode step); top-1 agreement "
        f"{report['prompt_top1_agreement']:.1%}; greedy {GREEDY_STEPS} tokens x 2 (left-padded) agreement "
        f"{report['greedy_token_agreement']:.1%}"
    )
    if not report["passed"]:
        if fused:
            raise _FusedGraphMismatch()
        kind = quantize or dtype
        raise FinetuneError(
            f"the ONNX export does not match PyTorch closely enough (see the numbers above; "
            f"thresholds: {LOGIT_TOLERANCE[kind]} logits, {MIN_TOP1_AGREEMENT[kind]:.0%} top-1); "
            f"pass --no-verify to keep it anyway"
        )
    return report


# Architectures whose attention mask is causal and padding masking only (no ALiBi or relative-position
# bias, which GroupQueryAttention would drop): the in-place KV cache is tried for these alone.
PLAIN_CAUSAL_ATTENTION = {"gpt2", "llama", "qwen2", "qwen3", "mistral", "gpt_neox"}


def _shared_kv_fits(model: PreTrainedModel, dtype: str) -> bool:
    """GroupQueryAttention (in place KV cache) for fp32 graphs, whose attention is causal with no window:
    ONNX Runtime's CPU kernel is fp32 only, and a sliding window would need its local_window_size."""
    window = getattr(model.config, "sliding_window", None)
    use_window = getattr(model.config, "use_sliding_window", window is not None)
    plain = model.config.model_type in PLAIN_CAUSAL_ATTENTION
    return plain and dtype == "fp32" and not (window and use_window)


def _trained_block_size(source: Path) -> Optional[int]:
    """The block size the checkpoint was trained with (`finetune eval --onnx` scores windows of it); None if unknown."""
    from finetune.run_state import TrainingState

    config = TrainingState.read_optional(str(source)).config
    data = config.get("data") if isinstance(config, dict) else None
    size = data.get("block_size") if isinstance(data, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _export_onnx(
    source: Path,
    output: Path,
    run_dir: Optional[Path],
    dtype: str,
    quantize: Optional[str],
    overwrite: bool,
    verify: bool,
    log: Callable[[str], None],
    optimize: bool,
) -> ExportResult:
    import time

    _check_onnx_request(dtype, quantize)
    model, tokenizer = _load_model(source, dtype)
    model_type = model.config.model_type
    _require_onnx_architecture(model_type)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize:
        _untie_output_layer(model)
    if optimize:
        onnx_optimize.prepare_model(model)
    layout = _cache_layout(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    external = size > EXTERNAL_DATA_BYTES
    tmp = output_dirs.start_output_dir(output, overwrite)
    try:
        with writing(output, "export"):  # a full disk: one line, and the temporary directory goes
            started = time.perf_counter()
            log(f"exporting {source} ({model_type}, {size / 1e6:.0f} MB of weights) to ONNX ...")
            graph = tmp / "staging" / "plain" / ONNX_FILE
            graph.parent.mkdir(parents=True)
            _export_graph(model, graph, layout, external)
            fusions: dict[str, int] = {}
            if optimize:
                graph, fusions = _fuse(graph, tmp / "staging", external, _shared_kv_fits(model, dtype), log)
            quantization = _write_weights(graph, tmp, quantize, external, log)
            shutil.rmtree(tmp / "staging")
            seconds = time.perf_counter() - started
            tokenizer.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            model.config.save_pretrained(tmp)
            shared_kv = "GroupQueryAttention" in fusions
            manifest = _manifest(model, tokenizer, layout, dtype, quantize, shared_kv)
            manifest.update(
                onnxruntime_fusions=fusions, quantization=quantization, training_block_size=_trained_block_size(source)
            )
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            (tmp / "README.md").write_text(
                model_card(run_dir, source, "ONNX" + (" int8" if quantize else ""), dtype, fused=bool(fusions)),
                encoding="utf-8",
            )
            report = None
            if verify:
                del model  # verify against the checkpoint as transformers loads it, without the export's module swaps
                report = _verify_export(source, tokenizer, tmp, dtype, quantize, bool(fusions), seconds, log)
            output_dirs.finish_output_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(f.stat().st_size for f in output.iterdir() if f.name.startswith(ONNX_FILE))
    log(f"exported to {output} ({total / 1e6:.1f} MB, {seconds:.1f} s)")
    return ExportResult(output, report)
