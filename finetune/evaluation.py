"""`finetune eval`: perplexity, mean loss and tokens counted of a model on data read as training reads it.

A run (its latest checkpoint, or every checkpoint with --all-checkpoints), a checkpoint, a model or an ONNX
export is scored on the same tokens (eval_data.py); --baseline scores a second model on them and reports the
change. The torch scorer lives here; the ONNX one (onnx_evaluation.py) runs without torch, and so does this
module on that path: torch is imported only inside the torch functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from finetune.errors import FinetuneError
from finetune.eval_data import EvalData, batches_of_windows, data_config, read_eval_data, same_tokens, window_ids
from finetune.eval_data import windows as make_windows
from finetune.eval_report import EvalReport, Figures, draw_checkpoints, write_json
from finetune.perplexity import Score

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from finetune.config import DataConfig


@dataclass
class EvalRequest:
    """What `finetune eval` was asked: the data, one model source, and how to score."""

    data: list[str]
    run: Optional[str] = None
    checkpoint: Optional[str] = None
    model: Optional[str] = None
    onnx: Optional[str] = None
    baseline: Optional[str] = None
    all_checkpoints: bool = False
    block_size: Optional[int] = None
    stride: Optional[int] = None
    batch_size: int = 8
    runs_dir: str = "runs"
    json_file: Optional[str] = None
    trust_remote_code: bool = False
    reading: dict[str, Any] = field(default_factory=dict)  # DataConfig reading fields set by flags


@dataclass
class Target:
    """A model to score: how the user named it, where it loads from, its step when it is a checkpoint."""

    label: str
    source: str
    step: Optional[int] = None


def check_request(request: EvalRequest) -> None:
    """Flags that do not go together, before anything is read."""
    given = [name for name in ("run", "checkpoint", "model", "onnx") if getattr(request, name)]
    if len(given) != 1:
        raise FinetuneError("pass one of --run, --checkpoint, --model or --onnx (the model to evaluate)")
    if not request.data:
        raise FinetuneError("name the data to evaluate on: `finetune eval DATA --run NAME` (files, directories, globs)")
    if request.all_checkpoints and not request.run:
        raise FinetuneError("--all-checkpoints evaluates the checkpoints of a run; pass --run NAME")
    for name in ("block_size", "stride", "batch_size"):
        value = getattr(request, name)
        if value is not None and value < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if request.json_file:
        parent = Path(request.json_file).resolve().parent
        if not parent.is_dir():
            raise FinetuneError(f"--json {request.json_file}: directory {parent} does not exist; create it first")


def evaluate(request: EvalRequest, log: Callable[[str], None] = print) -> EvalReport:
    """Score the model(s) asked for; the report's lines are printed by the caller, its JSON written here."""
    from finetune.data_files import resolve_files

    check_request(request)
    files = resolve_files(request.data)  # a missing data file is named before any model is loaded
    report = _evaluate_onnx(request, files) if request.onnx else _evaluate_torch(request, files, log)
    if request.json_file:
        write_json(report, Path(request.json_file))
    return report


# ---------------------------------------------------------------------------------------------
# ONNX Runtime: no torch on this path
# ---------------------------------------------------------------------------------------------


def _evaluate_onnx(request: EvalRequest, files: list[Path]) -> EvalReport:
    from finetune.onnx_evaluation import context_of, load_export, score_onnx, trained_block_size
    from finetune.token_cache import block_size_for

    lm, tokenizer = load_export(request.onnx)
    baseline = load_export(request.baseline) if request.baseline else None  # a second export: int8 against fp32
    data_cfg = data_config(None, request.reading)
    block = block_size_for(request.block_size or trained_block_size(lm), context_of(lm))
    exports = [(lm, request.onnx)] + ([(baseline[0], request.baseline)] if baseline else [])
    for export, name in exports:
        _require_context(block, context_of(export), name)
    data = read_eval_data(files, tokenizer, block, data_cfg)
    stride = request.stride or block
    report = EvalReport(
        request.data,
        data.describe(),
        block,
        stride,
        Figures(request.onnx, score_onnx(lm, data, block, stride, request.batch_size)),
    )
    if baseline is not None:
        baseline_data = read_eval_data(files, baseline[1], block, data_cfg)
        _require_same_tokens(data, baseline_data, request.onnx, request.baseline)
        report.baseline = Figures(request.baseline, score_onnx(baseline[0], data, block, stride, request.batch_size))
    return report


# ---------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------


def _evaluate_torch(request: EvalRequest, files: list[Path], log: Callable[[str], None]) -> EvalReport:
    from finetune.modeling import quiet_libraries

    targets, run_dir = _targets(request)
    data_cfg = data_config(run_dir, request.reading)
    with quiet_libraries():
        latest = targets[-1]
        model, tokenizer = _load(latest, request.trust_remote_code)  # the latest checkpoint's tokenizer is the run's
        block = _block_size(request.block_size or data_cfg.block_size, model, latest.label)
        data = read_eval_data(files, tokenizer, block, data_cfg)
        stride = None if data.supervised else (request.stride or block)
        if data.supervised and request.stride:
            raise FinetuneError(
                "--stride applies to plain text; prompt/completion and chat examples are scored one per row"
            )
        figures, skipped = _score_targets(targets, model, data, block, stride, request, log)
        report = EvalReport(request.data, data.describe(), block, stride, figures[-1])
        if request.all_checkpoints:
            report.checkpoints, report.skipped = figures, skipped
        if request.baseline:
            report.baseline = _score_baseline(request, files, data, data_cfg, block, stride, latest.label)
    if request.all_checkpoints:
        report.plot = run_dir / f"eval-{_file_stem(files)}.png"
        draw_checkpoints(report, run_dir.name, report.plot)
    return report


def _targets(request: EvalRequest) -> tuple[list[Target], Optional[Path]]:
    """The models to score (oldest checkpoint first), and the run whose data settings apply."""
    from finetune import checkpoint as ckpt
    from finetune import runs
    from finetune.api import _checkpoint_dir

    if request.model:
        return [Target(request.model, request.model)], None
    if request.checkpoint:
        source = _checkpoint_dir(request.checkpoint)
        run_dir = source.parent if runs.is_run_dir(source.parent) else None
        return [Target(str(source), str(source), _step_of(source))], run_dir
    run_dir = runs.find_run(request.runs_dir, request.run)
    if not request.all_checkpoints:
        source = runs.checkpoint_for_run(run_dir)
        return [Target(str(source), str(source), _step_of(source))], run_dir
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        runs.checkpoint_for_run(run_dir)  # its line: the run has no checkpoint yet
    return [Target(str(p), str(p), _step_of(p)) for p in found], run_dir


def _step_of(checkpoint: Path) -> Optional[int]:
    from finetune.checkpoint import CHECKPOINT_RE

    match = CHECKPOINT_RE.match(checkpoint.name)
    return int(match.group(1)) if match else None


def _load(target: Target, trust_remote_code: bool):
    from finetune.generation import load_for_generation

    return load_for_generation(target.source, trust_remote_code)


def _block_size(requested: Optional[int], model: PreTrainedModel, name: str) -> int:
    """`requested` (--block-size, else the run's), else the model's context up to training's default."""
    from finetune.modeling import context_length
    from finetune.token_cache import block_size_for

    context = context_length(model.config)
    block = block_size_for(requested, context)
    _require_context(block, context, name)
    return block


def _require_context(block: int, context: int, name: str) -> None:
    if block > context:
        raise FinetuneError(
            f"--block-size {block} exceeds the context of {name} ({context} tokens); use --block-size {context} or less"
        )


def _score_targets(
    targets: list[Target],
    latest_model: PreTrainedModel,
    data: EvalData,
    block: int,
    stride: Optional[int],
    request: EvalRequest,
    log: Callable[[str], None],
) -> tuple[list[Figures], list[str]]:
    """Each target's figures (the latest is already loaded); with several (--all-checkpoints) a checkpoint
    that cannot be read is skipped and named, so one damaged checkpoint does not hide the others."""
    figures: list[Figures] = []
    skipped: list[str] = []
    for target in targets:
        if target is targets[-1]:
            model = latest_model
        else:
            try:
                model, _ = _load(target, request.trust_remote_code)
            except FinetuneError as exc:
                log(f"warning: skipping {target.label}: {exc}")
                skipped.append(f"{target.label}: {exc}")
                continue
        score = score_torch(model, data, block, stride, request.batch_size)
        figures.append(Figures(target.label, score, target.step))
        if len(targets) > 1:
            log(f"{target.label}: perplexity {figures[-1].score.perplexity:.2f}")
    return figures, skipped


def _score_baseline(
    request: EvalRequest,
    files: list[Path],
    data: EvalData,
    data_cfg: DataConfig,
    block: int,
    stride: Optional[int],
    name: str,
) -> Figures:
    """The baseline on the same tokens: its tokenizer must read the data as the same ids."""
    target = Target(request.baseline, request.baseline)
    model, tokenizer = _load(target, request.trust_remote_code)
    _block_size(block, model, request.baseline)  # the windows must fit its context too
    _require_same_tokens(data, read_eval_data(files, tokenizer, block, data_cfg), name, request.baseline)
    return Figures(request.baseline, score_torch(model, data, block, stride, request.batch_size))


def _require_same_tokens(a: EvalData, b: EvalData, name: str, baseline: str) -> None:
    if not same_tokens(a, b):
        raise FinetuneError(
            f"--baseline {baseline} reads the data as other tokens than {name} (another tokenizer): "
            f"perplexities over different tokens do not compare; choose a baseline with the same tokenizer"
        )


def _file_stem(files: list[Path]) -> str:
    return files[0].stem if files else "data"


def score_torch(model: PreTrainedModel, data: EvalData, block: int, stride: Optional[int], batch_size: int) -> Score:
    """Summed next-token loss and tokens scored: sliding windows over a stream, or masked examples."""
    import torch

    model.eval()
    with torch.no_grad():
        if data.examples is not None:
            return _score_examples(model, data, batch_size)
        return _score_windows(model, data, block, stride or block, batch_size)


def _token_nll(logits, targets):
    """Per-position next-token loss (float32 softmax, as training's loss), shape (rows, positions)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def _score_windows(model: PreTrainedModel, data: EvalData, block: int, stride: int, batch_size: int) -> Score:
    import torch

    device = next(model.parameters()).device
    score = Score()
    for batch in batches_of_windows(make_windows(len(data.stream), block, stride), batch_size):
        ids = torch.from_numpy(window_ids(data.stream, batch)).to(device)
        nll = _token_nll(model(input_ids=ids).logits[:, :-1], ids[:, 1:]).double()
        for row, window in enumerate(batch):
            # Column j - 1 is the prediction of the window's token j; it scores tokens first.. of it.
            score.add(float(nll[row, window.first - 1 :].sum()), window.scored)
    return score


def _score_examples(model: PreTrainedModel, data: EvalData, batch_size: int) -> Score:
    """Each example on its own row, only its learned tokens (the completion, the assistant turns) scored."""
    from finetune.batching import collate_examples

    device = next(model.parameters()).device
    # Rows are padded on the right: a pad token is never attended to by a real one, nor scored, so any id does.
    collate = collate_examples(0)
    score = Score()
    examples = data.examples
    for start in range(0, len(examples), batch_size):
        batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        learned = labels != -100
        nll = _token_nll(logits, labels.clamp(min=0)).double()
        score.add(float(nll[learned].sum()), int(learned.sum()))
    return score
