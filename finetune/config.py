"""Configuration dataclasses and their resolution: defaults < `--config FILE.yaml` < CLI flags.

This module must stay light (no torch, no transformers): `finetune --help` imports it.
A YAML file has one section per dataclass, with the field names as keys:

    model:
      name: tiny
    data:
      block_size: 128
    train:
      steps: 400
      lr: 1e-3
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from finetune.errors import FinetuneError
from finetune.records import FORMATS

# Built-in model presets that are created from scratch (no hub access needed). Their training
# defaults differ from fine-tuning a pretrained model: a random model needs a much higher
# learning rate and many passes over a small corpus.
SCRATCH_PRESETS = ("tiny", "tiny-llama")

PRESET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    preset: {
        "data": {"block_size": 128},
        "train": {
            "steps": 200,
            "batch_size": 16,
            "lr": 2e-3,
            "warmup": 20,
            "weight_decay": 0.1,
            "eval_every": 50,
            "sample_every": 100,
            "save_every": 100,
        },
    }
    for preset in SCRATCH_PRESETS
}

# LoRA trains a few small matrices from zero: at full fine-tuning's learning rate it barely moves.
# bench/lora_lr.py (bench/RESULTS.md): the base's validation perplexity was cut by 32% at 1e-4, 80%
# at 1e-3 and 89% at 3e-3, where full fine-tuning at 1e-4 cut it by 92%. 1e-3 is ten times full
# fine-tuning's default, the usual LoRA ratio; the small bench model tolerates more than large ones.
ADAPTER_DEFAULTS: dict[str, dict[str, Any]] = {"train": {"lr": 1e-3}}

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

# Defaults that depend on the run, so they are not a field's default: the help text reads them here too.
DEFAULT_STEPS = 1000  # optimizer steps when neither --steps nor --epochs is given
MAX_DEFAULT_BLOCK = 1024  # tokens per block when --block-size is not given and the model's context is longer
# Steps between reading the loss back to the host: every step on CPU (a non-finite step is skipped at once);
# on a GPU each read stalls the queue of kernels, so every 10.
LOSS_SYNC_EVERY = {"cpu": 1, "cuda": 10}


def cache_root(configured: Optional[str] = None) -> Path:
    """Where finetune keeps its caches and error logs: --cache-dir, else $FINETUNE_CACHE, else ~/.cache/finetune."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("FINETUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "finetune"


@dataclass
class ModelConfig:
    """Which model to fine-tune."""

    name: str = "gpt2"  # hub id, local directory, or a from-scratch preset: tiny, tiny-llama
    trust_remote_code: bool = False  # run model code shipped with a hub repo (off: it is arbitrary code)
    lora: bool = False  # train LoRA adapters (peft) instead of all weights
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA path
    lora_targets: list[str] = field(default_factory=list)  # module names; empty: per-architecture defaults
    load_in_4bit: bool = False  # QLoRA: 4-bit base weights (bitsandbytes, CUDA only)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token blocks."""

    paths: list[str] = field(default_factory=list)  # files (.txt .csv .tsv .jsonl .json .parquet), directories or globs
    datasets: list[str] = field(default_factory=list)  # hub dataset ids (need network)
    split: str = "train"  # split of hub datasets and of saved DatasetDicts
    format: Optional[str] = None  # one of records.FORMATS; None: from the file extension
    text_field: str = "text"  # field / column holding the text of plain records
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping
    block_size: Optional[int] = None  # tokens per training block; None: min(1024, model context)
    line_by_line: bool = False  # each non-empty line is a document (instead of each file)
    val_fraction: float = 0.05  # share of blocks held out for validation (0 disables)
    val_file: Optional[str] = None  # a separate validation file; overrides val_fraction
    eos_string: str = "<|endoftext|>"  # this string in the text also separates documents
    encoding: str = "utf-8"  # text encoding of the input files
    cache_dir: Optional[str] = None  # tokenized-data cache; None: $FINETUNE_CACHE or ~/.cache/finetune


@dataclass
class TrainConfig:
    """How the training loop runs and where it writes."""

    run_name: Optional[str] = None  # None: named after the first data file
    runs_dir: str = "runs"  # parent directory of all runs
    steps: Optional[int] = None  # optimizer steps; None: from epochs, else 1000
    epochs: Optional[float] = None  # passes over the training blocks (used when steps is None)
    batch_size: int = 8  # blocks per device per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.01  # AdamW decay on weight matrices (never on biases and norms)
    warmup: float = 0.02  # warmup length: a fraction of steps if < 1, else a step count
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "sgd"] = "adamw"  # adamw8bit needs CUDA + bitsandbytes
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    compile: Optional[bool] = None  # torch.compile the model; None: on with CUDA, off on CPU
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    fused_loss: Optional[bool] = None  # chunked cross-entropy (no full fp32 logits); None: on with CUDA
    pad_vocab: Optional[bool] = None  # pad embeddings to a multiple of 64 (for tensor cores); None: on with CUDA
    # GELU, dropout, attention and allocator fast paths (cpu_kernels.py); None: on without CUDA
    cpu_kernels: Optional[bool] = None
    loss_sync_every: Optional[int] = None  # read the loss back to the host every N steps; None: 1 on CPU, 10 on CUDA
    freeze_layers: int = 0  # freeze the embeddings and the first N transformer blocks
    train_only_blocks: bool = False  # train transformer blocks only (gpt-2-simple's only_train_transformer_layers)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16/fp16 on GPU, fp32 on CPU
    eval_every: int = 100  # steps between validation passes (0 disables)
    eval_batches: int = 50  # at most this many batches per validation pass
    sample_every: int = 200  # steps between samples written to samples/ (0 disables)
    sample_tokens: int = 120  # new tokens per training-time sample
    print_samples: bool = True  # also print those samples above the progress bar (gpt-2-simple did)
    save_every: int = 500  # steps between checkpoints (0: only at the end)
    keep: int = 3  # checkpoints kept on disk (the newest ones)
    log_every: int = 10  # steps between metrics.jsonl entries
    seed: int = 42  # seeds data order, initialisation and sampling
    resume: str = "latest"  # existing run: latest (continue it), fresh (refuse unless overwrite), or a checkpoint dir
    overwrite: bool = False  # delete an existing run of the same name first


@dataclass
class RunConfig:
    """Everything `finetune train` needs; written to runs/<name>/config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


@dataclass
class GenerateConfig:
    """Sampling options shared by `finetune generate` and the Python API."""

    prompts: list[str] = field(default_factory=lambda: [""])  # "" samples unconditionally
    n: int = 1  # samples per prompt
    batch_size: int = 8  # sequences decoded together
    max_new_tokens: int = 200  # tokens generated after the prompt
    temperature: float = 0.8  # 0 means greedy decoding
    top_k: int = 50  # keep the k most likely tokens (0 disables)
    top_p: float = 0.95  # nucleus sampling mass (1 disables)
    repetition_penalty: float = 1.0  # >1 discourages repeats
    seed: Optional[int] = None  # fixes the samples; None: different each time
    stop: list[str] = field(default_factory=list)  # cut each sample at the first of these strings
    include_prompt: bool = True  # start each sample with its prompt
    output: Optional[str] = None  # append samples to this file
    stream: Optional[bool] = None  # print tokens as they come; None: when one sample is asked for
    static_cache: Optional[bool] = None  # static KV cache + compiled decoding; None: on with CUDA


@dataclass
class ExportConfig:
    """What `finetune export` writes (the CLI's choices and defaults, and the Python API's checks)."""

    format: Literal["safetensors", "onnx"] = "safetensors"  # Hugging Face directory, or ONNX with a KV cache
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # weight precision (ONNX: fp32 or fp16)
    quantize: Optional[Literal["int8"]] = None  # ONNX only: int8 weights


@dataclass
class ServeConfig:
    """`finetune serve`'s server options (the CLI's defaults; sampling defaults come from GenerateConfig)."""

    host: str = "127.0.0.1"  # loopback only: pass 0.0.0.0 to listen on every interface
    port: int = 8000
    max_batch_size: int = 8  # requests decoded together (one batched step each)
    max_queue: int = 64  # requests waiting for a slot beyond that; more are answered 429
    shutdown_grace_s: float = 30.0  # SIGTERM/Ctrl-C: in-flight requests get this long to finish


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def default(section: type, name: str) -> Any:
    """The default of a config field: the one place it is written (the CLI's help reads it here)."""
    (spec,) = [f for f in dataclasses.fields(section) if f.name == name]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def choices(section: type, name: str) -> tuple[str, ...]:
    """The values a Literal-typed config field allows (the CLI's click.Choice reads them here)."""
    hint = typing.get_type_hints(section)[name]
    if typing.get_origin(hint) is typing.Union:  # Optional[Literal[...]]
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return typing.get_args(hint)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _describe(inner[0]) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp`, converting where YAML is loose (e.g. '1e-3')."""
    origin = typing.get_origin(tp)
    bad = FinetuneError(f"config key '{key}' must be {_describe(tp)}, got {value!r}")
    if origin is typing.Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return coerce(key, value, inner)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        return _coerce_list(value, bad)
    return _SCALARS[tp](value, bad)  # _describe has already refused any other type


def _coerce_list(value: Any, bad: FinetuneError) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise bad
    return list(value)


def _coerce_bool(value: Any, bad: FinetuneError) -> bool:
    if not isinstance(value, bool):
        raise bad
    return value


def _coerce_int(value: Any, bad: FinetuneError) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad
    return value


def _coerce_float(value: Any, bad: FinetuneError) -> float:
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad
    return float(value)


def _coerce_str(value: Any, bad: FinetuneError) -> str:
    if not isinstance(value, str):
        raise bad
    return value


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _apply(section_obj: Any, section: str, values: dict[str, Any], origin: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            raise FinetuneError(f"unknown config key '{section}.{key}' in {origin}{hint}")
        setattr(section_obj, key, coerce(f"{section}.{key}", value, hints[key]))


def apply_layer(cfg: RunConfig, layer: dict[str, Any], origin: str) -> None:
    """Overlay one layer ({section: {key: value}}) onto `cfg`, rejecting unknown keys."""
    if not isinstance(layer, dict):
        raise FinetuneError(f"{origin} must be a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in layer.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise FinetuneError(
                f"unknown config section '{section}' in {origin}{hint}; sections are: {', '.join(SECTIONS)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise FinetuneError(f"config section '{section}' in {origin} must be a mapping")
        _apply(getattr(cfg, section), section, values, origin)


def find_config_file(name: str) -> Path:
    """A path, or the name of a preset in configs/ (e.g. 'tiny' -> configs/tiny.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise FinetuneError(f"config file '{name}' is a directory; pass a YAML file (e.g. configs/tiny.yaml)")
    for candidate in (CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.is_dir() else []
    listing = f"; bundled presets: {', '.join(presets)}" if presets else ""
    raise FinetuneError(f"config file '{name}' not found; pass a path to a YAML file{listing}")


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise FinetuneError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    except UnicodeDecodeError:
        raise FinetuneError(f"config file {path} is not UTF-8 text") from None
    return data or {}


def resolve_run_config(
    config_file: Optional[str] = None, overrides: Optional[dict[str, dict[str, Any]]] = None
) -> RunConfig:
    """Build the run configuration: defaults < preset defaults < config file < overrides.

    `overrides` holds only the values the user set (CLI flags or API keywords); None means unset.
    """
    overrides = {s: {k: v for k, v in vals.items() if v is not None} for s, vals in (overrides or {}).items()}
    file_layer: dict[str, Any] = {}
    file_origin = ""
    if config_file:
        path = find_config_file(config_file)
        file_layer = load_yaml(path)
        file_origin = str(path)

    # The model name decides the preset defaults, so find it first (flags beat the file).
    probe = RunConfig()
    if file_layer:
        apply_layer(probe, file_layer, file_origin)
    apply_layer(probe, overrides, "the command line")

    cfg = RunConfig()
    if probe.model.name in PRESET_DEFAULTS:
        apply_layer(cfg, PRESET_DEFAULTS[probe.model.name], f"the '{probe.model.name}' preset")
    if probe.model.lora:
        apply_layer(cfg, ADAPTER_DEFAULTS, "the LoRA defaults")
    if file_layer:
        apply_layer(cfg, file_layer, file_origin)
    apply_layer(cfg, overrides, "the command line")
    validate_run_config(cfg)
    # A warmup asked for on the command line that outlasts the run would keep the LR near 0. (A
    # preset's or a config file's warmup with a shorter --steps is a quick trial run: it stays.)
    if "warmup" in overrides.get("train", {}):
        t = cfg.train
        _require(
            t.steps is None or t.warmup < 1 or t.warmup < t.steps,
            f"train.warmup (--warmup) of {t.warmup:g} steps is not shorter than the {t.steps} training steps, so "
            f"the learning rate would never reach --lr; use a fraction such as 0.02, or fewer warmup steps",
        )
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FinetuneError(message)


def validate_run_config(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express; each names the key and the fix."""
    d, t = cfg.data, cfg.train
    _require(
        bool(d.paths) or bool(d.datasets),
        "no training data given; pass one or more files, directories or globs (or --dataset NAME)",
    )
    _require(
        d.format is None or d.format in FORMATS,
        f"data.format (--format) must be one of {', '.join(FORMATS)}",
    )
    _require(d.block_size is None or d.block_size >= 2, "data.block_size (--block-size) must be at least 2")
    _require(0 <= d.val_fraction < 1, "data.val_fraction (--val-fraction) must be in [0, 1), e.g. 0.05")
    _require(t.steps is None or t.steps >= 1, "train.steps (--steps) must be at least 1")
    _require(t.epochs is None or t.epochs > 0, "train.epochs (--epochs) must be positive")
    _require(t.batch_size >= 1, "train.batch_size (--batch-size) must be at least 1")
    _require(t.grad_accum >= 1, "train.grad_accum (--grad-accum) must be at least 1")
    _require(t.lr > 0, "train.lr (--lr) must be positive, e.g. 1e-4")
    _require(t.weight_decay >= 0, "train.weight_decay (--weight-decay) must be >= 0")
    _require(t.warmup >= 0, "train.warmup (--warmup) must be >= 0 (a fraction < 1 or a step count)")
    _require(0 <= t.seed < 2**32, "train.seed (--seed) must be in [0, 2**32 - 1]")
    _require(t.max_grad_norm >= 0, "train.max_grad_norm (--max-grad-norm) must be >= 0 (0 disables clipping)")
    for key in ("eval_every", "sample_every", "save_every", "sample_tokens"):
        _require(getattr(t, key) >= 0, f"train.{key} (--{key.replace('_', '-')}) must be >= 0")
    _require(t.eval_batches >= 1, "train.eval_batches must be at least 1")
    _require(t.keep >= 1, "train.keep (--keep) must be at least 1")
    _require(t.log_every >= 1, "train.log_every (--log-every) must be at least 1")
    _require(
        t.loss_sync_every is None or t.loss_sync_every >= 1,
        "train.loss_sync_every (--loss-sync-every) must be at least 1",
    )
    _require(t.freeze_layers >= 0, "train.freeze_layers (--freeze-layers) must be >= 0")
    m = cfg.model
    _require(m.lora_r >= 1, "model.lora_r (--lora-r) must be at least 1")
    _require(m.lora_alpha >= 1, "model.lora_alpha (--lora-alpha) must be at least 1")
    _require(0 <= m.lora_dropout < 1, "model.lora_dropout (--lora-dropout) must be in [0, 1)")
    _require(not m.load_in_4bit or m.lora, "--load-in-4bit (QLoRA) trains adapters only: add --lora")
    _require(
        not (m.lora and (t.freeze_layers or t.train_only_blocks)),
        "--lora already freezes the base model; drop --freeze-layers / --train-only-blocks",
    )
    if t.run_name is not None:
        _require(
            t.run_name not in ("", ".", "..") and "/" not in t.run_name and "\\" not in t.run_name,
            f"run name {t.run_name!r} is not a plain name; use letters, digits, '-' or '_'",
        )


def validate_generate_config(cfg: GenerateConfig) -> None:
    _require(cfg.n >= 1, "--n must be at least 1")
    _require(cfg.batch_size >= 1, "--batch-size must be at least 1")
    _require(cfg.max_new_tokens >= 1, "--max-new-tokens must be at least 1")
    _require(cfg.temperature >= 0, "--temperature must be >= 0 (0 means greedy)")
    _require(cfg.top_k >= 0, "--top-k must be >= 0 (0 disables it)")
    _require(0 < cfg.top_p <= 1, "--top-p must be in (0, 1] (1 disables it)")
    _require(cfg.repetition_penalty > 0, "--repetition-penalty must be positive (1 disables it)")
    _require(all(s for s in cfg.stop), "--stop strings must not be empty")
    _require(bool(cfg.prompts), "give at least one prompt (or none for unconditional samples)")
    _require(cfg.seed is None or 0 <= cfg.seed < 2**32, "--seed must be in [0, 2**32 - 1]")


def dump_yaml(cfg: RunConfig, path: Path) -> None:
    import yaml

    from finetune.files import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "run config")
