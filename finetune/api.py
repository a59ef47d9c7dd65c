"""The Python API: `finetune.train(...)` and `finetune.generate(...)`, for notebooks and scripts.

The CLI is a thin layer over these two functions, so both share one set of defaults.
Heavy libraries (torch, transformers) are imported only when a function runs.
"""

from __future__ import annotations

import dataclasses
import shutil
import typing
from pathlib import Path
from typing import Any, Optional, Union

from finetune.config import (
    SECTIONS,
    ExportConfig,
    GenerateConfig,
    TrainConfig,
    choices,
    coerce,
    default,
    resolve_run_config,
    validate_generate_config,
)
from finetune.errors import FinetuneError

# Every config field has a unique name across sections, so keywords can be flat:
# train("data.txt", model="tiny", steps=200) sets model.name, data.paths and train.steps.
_KEYWORD_TO_KEY = {"model": ("model", "name"), "data": ("data", "paths")}
for _section, _cls in SECTIONS.items():
    for _field in dataclasses.fields(_cls):
        _KEYWORD_TO_KEY.setdefault(_field.name, (_section, _field.name))
_KEYWORD_TO_KEY.pop("name")
_KEYWORD_TO_KEY.pop("paths")


def overrides_from_keywords(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for keyword, value in values.items():
        if keyword not in _KEYWORD_TO_KEY:
            raise FinetuneError(f"unknown option '{keyword}'; options are: {', '.join(sorted(_KEYWORD_TO_KEY))}")
        section, key = _KEYWORD_TO_KEY[keyword]
        layer[section][key] = value
    return layer


def train_config(data: Union[str, list[str], None], config: Optional[str], options: dict):
    """The run's configuration from a config file, the data and keyword options (as `train` takes them)."""
    options = dict(options)
    if data is not None:
        options["data"] = _paths(data)
    return resolve_run_config(config, overrides_from_keywords(options))


def _paths(data) -> list[str]:
    """`data` as a list of path strings: one path, or a list or tuple of them."""
    if isinstance(data, (str, Path)):
        return [str(data)]
    if isinstance(data, (list, tuple)) and all(isinstance(d, (str, Path)) for d in data):
        return [str(d) for d in data]
    raise FinetuneError(f"data must be a path or a list of paths, got {data!r}")


def train(
    data: Union[str, list[str], None] = None,
    *,
    config: Optional[str] = None,
    log=print,
    command: Optional[str] = None,
    dry_run: bool = False,
    **options,
):
    """Fine-tune a model on text files; returns a TrainResult (run_dir, checkpoint, step, val_loss).

    >>> finetune.train("sample_data/recipes.txt", model="tiny", steps=300)
    """
    from finetune.training import train as run_training

    cfg = train_config(data, config, options)
    if dry_run:
        from finetune.planner import dry_run as plan_run

        return plan_run(cfg, log=log)
    return run_training(cfg, log=log, command=command)


def resolve_generation_source(
    run: Optional[str], checkpoint: Optional[str], model: Optional[str], runs_dir: str, log=None
) -> str:
    """The directory or hub id to sample from: --checkpoint, --model, or a run's latest checkpoint.

    Without any of them the most recent run is used, and `log` says which (sampling from an
    unexpected run would otherwise look like a bad model).
    """
    from finetune import runs

    given = [x for x in (run, checkpoint, model) if x]
    if len(given) > 1:
        raise FinetuneError("pass only one of --run, --checkpoint and --model")
    if checkpoint:
        return str(_checkpoint_dir(checkpoint))
    if model:
        return model
    run_dir = runs.find_run(runs_dir, run, other_sources="pass --checkpoint DIR or --model NAME_OR_DIR")
    source = runs.checkpoint_for_run(run_dir)
    if not run and log:
        log(f"sampling from run '{run_dir.name}' ({source}), the most recent in {runs_dir}/; pass --run NAME to choose")
    return str(source)


def _checkpoint_dir(checkpoint: str) -> Path:
    """--checkpoint DIR: an existing directory, and not a run directory (whose checkpoints are inside it)."""
    from finetune.runs import misplaced_run_dir

    path = Path(checkpoint)
    if not path.is_dir():
        raise FinetuneError(f"checkpoint directory '{checkpoint}' does not exist; check the path")
    problem = misplaced_run_dir(path)
    if problem:
        raise FinetuneError(problem)
    return path


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def generate(
    prompt: Union[str, list[str], None] = None,
    *,
    run: Optional[str] = None,
    checkpoint: Optional[str] = None,
    model: Optional[str] = None,
    onnx: Optional[str] = None,
    runs_dir: str = default(TrainConfig, "runs_dir"),
    trust_remote_code: bool = False,
    write=None,
    log=_stderr,
    **options,
) -> list[str]:
    """Sample text from a run (its latest checkpoint), a checkpoint directory, a model id, or an ONNX export.

    Notes (which run was used, samples that came out empty) go to `log`, stderr by default.

    >>> finetune.generate("Title:", run="recipes", n=3, seed=1)
    >>> finetune.generate("Title:", onnx="exports/recipes-onnx")   # ONNX Runtime, no torch needed
    """
    from finetune.generation import append_samples, warn_empty_samples
    from finetune.modeling import quiet_libraries

    if prompt is not None:
        options["prompts"] = prompt
    hints = typing.get_type_hints(GenerateConfig)
    unknown = sorted(set(options) - set(hints))
    if unknown:
        raise FinetuneError(f"unknown option(s) {', '.join(unknown)}; options are: {', '.join(sorted(hints))}")
    # Checked and converted as a config file's values are: a single string is a list of one
    # (stop="###" must not become a stop at every '#').
    cfg = GenerateConfig(**{key: coerce(key, value, hints[key]) for key, value in options.items()})
    validate_generate_config(cfg)
    if cfg.output:
        from finetune.generation import check_samples_output

        check_samples_output(Path(cfg.output))
    source = None
    with quiet_libraries():
        if onnx:
            if run or checkpoint or model:
                raise FinetuneError("pass --onnx alone, not with --run, --checkpoint or --model")
            from finetune.onnx_generation import OnnxCausalLM, generate_texts_onnx

            texts = generate_texts_onnx(OnnxCausalLM(onnx), cfg, write=write)
        else:
            from finetune.generation import generate_texts, is_chat_checkpoint, load_for_generation

            source = resolve_generation_source(run, checkpoint, model, runs_dir, log=log)
            lm, tokenizer = load_for_generation(source, trust_remote_code)
            texts = generate_texts(lm, tokenizer, cfg, write=write, chat=is_chat_checkpoint(source))
    warn_empty_samples(cfg, texts, source, log)
    if cfg.output:
        append_samples(Path(cfg.output), texts)
    return texts


def export(
    *,
    run: Optional[str] = None,
    checkpoint: Optional[str] = None,
    format: str = default(ExportConfig, "format"),
    output: Optional[str] = None,
    dtype: str = default(ExportConfig, "dtype"),
    quantize: Optional[str] = None,
    verify: bool = True,
    overwrite: bool = False,
    runs_dir: str = default(TrainConfig, "runs_dir"),
    log=print,
    optimize: bool = True,
):
    """Export a run's latest checkpoint (or a checkpoint directory) as safetensors or ONNX.

    >>> finetune.export(run="recipes", format="onnx", quantize="int8")
    """
    from finetune import exporting as exporter
    from finetune import runs
    from finetune.locking import exclusive
    from finetune.modeling import quiet_libraries
    from finetune.output_dirs import refuse_training_output

    formats, dtypes, quantizations = (choices(ExportConfig, name) for name in ("format", "dtype", "quantize"))
    if format not in formats:
        raise FinetuneError(f"unknown export format '{format}'; use {' or '.join(formats)}")
    if dtype not in dtypes:
        raise FinetuneError(f"unknown --dtype '{dtype}'; use {', '.join(dtypes[:-1])} or {dtypes[-1]}")
    if quantize is not None and quantize not in quantizations:
        raise FinetuneError(f"unknown --quantize '{quantize}'; only {' or '.join(quantizations)} is supported")
    if quantize and format != "onnx":
        raise FinetuneError("--quantize int8 applies to --format onnx only")
    if run and checkpoint:
        raise FinetuneError("pass only one of --run and --checkpoint")
    if checkpoint:
        source = _checkpoint_dir(checkpoint)
        run_dir = source.parent if runs.is_run_dir(source.parent) else None
    else:
        run_dir = runs.find_run(runs_dir, run)
        source = runs.checkpoint_for_run(run_dir)
    suffix = "-".join(x for x in (format, quantize or (dtype if dtype != "fp32" else None)) if x)
    target = Path(output) if output else Path("exports") / f"{run_dir.name if run_dir else source.name}-{suffix}"
    refuse_training_output(target, source, run_dir, Path(runs_dir))
    with exclusive(target, f"export output {target}", "choose another --output"), quiet_libraries():
        if format == "onnx":
            return exporter.export_onnx(source, target, run_dir, dtype, quantize, overwrite, verify, log, optimize)
        return exporter.export_safetensors(source, target, run_dir, dtype, overwrite, verify, log)


def prepare(
    data: Union[str, list[str], None] = None, *, output: str, config: Optional[str] = None, log=print, **options
):
    """Tokenize once into a portable directory that `finetune train DIR` accepts (prepare here, train elsewhere).

    >>> finetune.prepare("chats.jsonl", model="gpt2", output="prepared/chats")
    """
    from finetune.data_files import resolve_files
    from finetune.locking import exclusive
    from finetune.prepared import is_prepared_dir
    from finetune.reading import check_encoding

    if data is not None:
        options["data"] = _paths(data)
    cfg = resolve_run_config(config, overrides_from_keywords(options))
    files = resolve_files(cfg.data.paths)
    check_encoding(cfg.data.encoding)  # before the output is taken and the tokenizer loaded
    if len(files) == 1 and is_prepared_dir(files[0]):
        raise FinetuneError(f"{files[0]} is already prepared; train on it with `finetune train {files[0]}`")
    target = Path(output)
    from finetune.output_dirs import refuse_training_output

    refuse_training_output(target, runs_dir=Path(cfg.train.runs_dir), writer="prepared data")
    # One process at a time per output directory, for prepare's whole life: two would overwrite
    # each other's temporary directory.
    with exclusive(target, f"output directory {output}", "choose another --output"):
        prepared = _prepare_into(cfg, files, target, log)
    log(f"wrote {output}: train on it with `finetune train {output} --model {cfg.model.name}`")
    return prepared


def _prepare_into(cfg, files: list[Path], output: Path, log):
    """Tokenize into a temporary directory beside `output`, renamed into place only when complete."""
    from finetune import modeling, output_dirs
    from finetune import prepared as prepared_dirs
    from finetune.token_cache import block_size_for, prepare_data, write_error

    try:  # a taken --output fails before any tokenizing
        tmp = output_dirs.start_output_dir(output, offer_overwrite=False)
    except OSError as exc:
        raise write_error(output, exc, "output directory", "--output") from None
    try:
        tokenizer = modeling.new_run_tokenizer(cfg, files)
        context = modeling.context_length(modeling.load_model_config(cfg.model.name, cfg.model.trust_remote_code))
        block_size = block_size_for(cfg.data.block_size, context)
        prepared = prepare_data(files, tokenizer, block_size, cfg.data, log=log)
        try:
            prepared_dirs.write_prepared(prepared, tokenizer, tmp, cfg.model.name)
            output_dirs.finish_output_dir(tmp, output)
        except OSError as exc:
            raise write_error(output, exc, "prepared data", "--output") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return prepared


def evaluate(
    data: Union[str, list[str], None] = None,
    *,
    run: Optional[str] = None,
    checkpoint: Optional[str] = None,
    model: Optional[str] = None,
    onnx: Optional[str] = None,
    baseline: Optional[str] = None,
    all_checkpoints: bool = False,
    block_size: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    json_file: Optional[str] = None,
    runs_dir: str = default(TrainConfig, "runs_dir"),
    trust_remote_code: bool = False,
    log=_stderr,
    **reading,
):
    """Perplexity, mean loss and tokens counted of a model on data read as training reads it; an EvalReport.

    >>> finetune.evaluate("held_out.txt", run="recipes", baseline="gpt2").lines()
    >>> finetune.evaluate("held_out.txt", onnx="exports/recipes-onnx")   # ONNX Runtime, no torch needed
    """
    from finetune.eval_data import READING_FIELDS
    from finetune.evaluation import EvalRequest
    from finetune.evaluation import evaluate as run_evaluation

    unknown = sorted(set(reading) - set(READING_FIELDS))
    if unknown:
        raise FinetuneError(f"unknown option(s) {', '.join(unknown)}; data options are: {', '.join(READING_FIELDS)}")
    request = EvalRequest(
        _paths(data) if data is not None else [],
        run=run,
        checkpoint=checkpoint,
        model=model,
        onnx=onnx,
        baseline=baseline,
        all_checkpoints=all_checkpoints,
        block_size=block_size,
        stride=stride,
        batch_size=batch_size,
        runs_dir=runs_dir,
        json_file=json_file,
        trust_remote_code=trust_remote_code,
        reading=reading,
    )
    return run_evaluation(request, log=log)


def list_runs(name: Optional[str] = None, *, runs_dir: str = default(TrainConfig, "runs_dir")):
    """The runs in `runs_dir` (a run_listing.Listing), or the run `name` in detail (a run_listing.RunDetail)."""
    from finetune import run_listing

    return run_listing.describe(runs_dir, name) if name else run_listing.list_runs(runs_dir)
