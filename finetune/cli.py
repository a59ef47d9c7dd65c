"""The `finetune` command: one thin function per subcommand over finetune.api.

Nothing heavy is imported at module level, so `finetune --help` stays fast (no torch).
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings

import click

from finetune.config import (
    ADAPTER_DEFAULTS,
    DEFAULT_STEPS,
    LOSS_SYNC_EVERY,
    MAX_DEFAULT_BLOCK,
    PRESET_DEFAULTS,
    SCRATCH_PRESETS,
    DataConfig,
    ExportConfig,
    GenerateConfig,
    ModelConfig,
    ServeConfig,
    TrainConfig,
    cache_root,
    choices,
    default,
)
from finetune.errors import DISTRIBUTION, FinetuneError
from finetune.records import FORMATS

EXIT_USER_ERROR = 2


def shown(value) -> str:
    """A default as help texts write it: on/off for switches, 1e-4 rather than 0.0001 for small numbers."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return str(value)


def _default(section: type, name: str) -> str:
    """The `[default: ...]` of a help text, read from the config dataclass."""
    return f"[default: {shown(default(section, name))}]"


def _saved_or(section, name: str) -> str:
    """Serve's sampling defaults: the model's own generation_config.json, else `finetune generate`'s."""
    return f"[default: the model's generation_config.json, else {shown(default(section, name))}]"


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


_SHOWN_WARNINGS: set[str] = set()


def _show_warning(message, category, *args, **kwargs) -> None:
    """One line per distinct warning: Python shows a warning once per call site, and several sites can raise
    the same one (e.g. each place that asks whether `--model tiny` names the preset)."""
    text = str(message)
    if text not in _SHOWN_WARNINGS:
        _SHOWN_WARNINGS.add(text)
        _echo_err(f"warning: {text}")


def _quiet_libraries() -> None:
    """One-line warnings, and no library chatter a user cannot act on.

    Environment variables rather than library calls, so nothing heavy is imported here (the ONNX
    generation path must run without torch or transformers).
    """
    from finetune.modeling import NOISY_MODULES  # light: modeling imports torch and transformers only when used

    _SHOWN_WARNINGS.clear()
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", module=NOISY_MODULES)
    # torch.export's pytree, raised via copyreg
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*treespec.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


UNEXPECTED = "error: unexpected"  # the last-resort handler's words; tests fail when a bad input reaches it


def _report_unexpected(exc: BaseException) -> None:
    """Anything unforeseen: one line naming the exception (and its file), the traceback in a log file.

    Reaching this means a cause went unnamed: a bug to fix, so the line says where the details are.
    """
    import time
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if os.environ.get("FINETUNE_DEBUG"):
        _echo_err(text.rstrip())
    filename = getattr(exc, "filename", None)
    where = f" (file {filename})" if filename else ""
    log_dir = cache_root() / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        log_file.write_text(f"{' '.join(shlex.quote(a) for a in sys.argv)}\n\n{text}", encoding="utf-8")
        details = f"the full traceback is in {log_file}"
    except OSError:
        details = "set FINETUNE_DEBUG=1 to print the full traceback"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _echo_err(f"{UNEXPECTED} {type(exc).__name__}: {message}{where}; {details}. Please report it with that file")


class FinetuneGroup(click.Group):
    """Every error ends as one line on stderr and a non-zero exit, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:  # click's own three lines (usage / try --help / error) as one
            command = exc.ctx.command_path if exc.ctx else "finetune"
            _echo_err(f"error: {exc.format_message()} (see `{command} --help`)")
            sys.exit(EXIT_USER_ERROR)
        except click.ClickException as exc:
            _echo_err(f"error: {exc.format_message()}")
            sys.exit(exc.exit_code)
        except click.Abort:
            _echo_err("aborted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FinetuneError as exc:
            _echo_err(f"error: {exc}")
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            _echo_err("aborted")
            ctx.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            _report_unexpected(exc)
            ctx.exit(1)


@click.group(cls=FinetuneGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name=DISTRIBUTION)
def main():
    """Fine-tune a causal language model on your text, then sample from it.

    \b
    Quick start (offline, CPU, about two minutes):
      finetune train sample_data/recipes.txt --model tiny
      finetune generate --run recipes --prompt "Title:" --n 3
    \b
    Fine-tune GPT-2 (124M) on your own data:
      finetune train my_data.txt --steps 1000
    """


# Options shared by `train` and `prepare`: how files become tokens.
DATA_OPTIONS = [
    click.option(
        "--block-size", type=int, help=f"Tokens per training block.  [default: min({MAX_DEFAULT_BLOCK}, model context)]"
    ),
    click.option("--line-by-line/--no-line-by-line", default=None, help="Each non-empty line is a document."),
    click.option(
        "--val-fraction",
        type=float,
        help=f"Share of blocks held out for validation.  {_default(DataConfig, 'val_fraction')}",
    ),
    click.option("--encoding", help=f"Text encoding of the data files.  {_default(DataConfig, 'encoding')}"),
    click.option(
        "--format",
        "format",
        type=click.Choice(FORMATS),
        help="Data format.  [default: from the file extension]",
    ),
    click.option(
        "--text-field",
        "--text-column",
        "text_field",
        help=f"Field/column with the text of plain records.  {_default(DataConfig, 'text_field')}",
    ),
    click.option(
        "--dataset", "datasets", multiple=True, help="A Hugging Face Hub dataset id (needs network); repeatable."
    ),
    click.option("--split", help=f"Split of --dataset and of saved DatasetDicts.  {_default(DataConfig, 'split')}"),
    click.option(
        "--skip-bad-rows", is_flag=True, default=None, help="Skip (and count) malformed CSV rows / JSON lines."
    ),
    click.option("--cache-dir", help="Tokenized-data cache.  [default: $FINETUNE_CACHE or ~/.cache/finetune]"),
]


def data_options(command):
    for option in reversed(DATA_OPTIONS):
        command = option(command)
    return command


@main.command(context_settings={"show_default": True})
@click.argument("data", nargs=-1)
@data_options
@click.option(
    "--model",
    "-m",
    help=f"Hub id, local model directory, or a from-scratch preset: {', '.join(SCRATCH_PRESETS)}.  "
    f"{_default(ModelConfig, 'name')}",
)
@click.option("--config", "config_file", help="YAML config file, or a preset name from configs/ (tiny, gpt2, gpu).")
@click.option("--run-name", help="Name of the run under --runs-dir.  [default: the first data file's name]")
@click.option("--runs-dir", help=f"Directory holding all runs.  {_default(TrainConfig, 'runs_dir')}")
@click.option("--steps", type=int, help=f"Optimizer steps.  [default: {DEFAULT_STEPS}, or from --epochs]")
@click.option("--epochs", type=float, help="Passes over the data (used when --steps is not given).")
@click.option(
    "--batch-size", type=int, help=f"Blocks per device per micro-step.  {_default(TrainConfig, 'batch_size')}"
)
@click.option("--grad-accum", type=int, help=f"Micro-steps per optimizer step.  {_default(TrainConfig, 'grad_accum')}")
@click.option(
    "--lr",
    type=float,
    help=f"Peak learning rate.  [default: {shown(default(TrainConfig, 'lr'))}; "
    f"{shown(ADAPTER_DEFAULTS['train']['lr'])} with --lora; {shown(PRESET_DEFAULTS['tiny']['train']['lr'])} for tiny]",
)
@click.option(
    "--warmup",
    type=float,
    help=f"Warmup: a fraction of steps if < 1, else a step count.  {_default(TrainConfig, 'warmup')}",
)
@click.option(
    "--schedule",
    type=click.Choice(choices(TrainConfig, "schedule")),
    help=f"LR decay after warmup.  {_default(TrainConfig, 'schedule')}",
)
@click.option(
    "--weight-decay",
    type=float,
    help=f"AdamW weight decay (never on biases/norms).  {_default(TrainConfig, 'weight_decay')}",
)
@click.option(
    "--max-grad-norm", type=float, help=f"Gradient clipping norm; 0 disables.  {_default(TrainConfig, 'max_grad_norm')}"
)
@click.option(
    "--precision",
    type=click.Choice(choices(TrainConfig, "precision")),
    help=f"auto: bf16 (or fp16) on GPU, fp32 on CPU.  {_default(TrainConfig, 'precision')}",
)
@click.option("--val-file", help="A separate validation text file (instead of --val-fraction).")
@click.option(
    "--eval-every",
    type=int,
    help=f"Steps between validation passes; 0 disables.  {_default(TrainConfig, 'eval_every')}",
)
@click.option(
    "--sample-every",
    type=int,
    help=f"Steps between samples written to the run's samples/; 0 disables.  {_default(TrainConfig, 'sample_every')}",
)
@click.option(
    "--print-samples/--no-print-samples",
    default=None,
    help=f"Also print those samples above the progress bar.  {_default(TrainConfig, 'print_samples')}",
)
@click.option(
    "--save-every",
    type=int,
    help=f"Steps between checkpoints; 0 saves only at the end.  {_default(TrainConfig, 'save_every')}",
)
@click.option(
    "--log-every", type=int, help=f"Steps between metrics.jsonl entries.  {_default(TrainConfig, 'log_every')}"
)
@click.option(
    "--report-to",
    help="Also send the metrics to experiment trackers: none, all (the installed ones), or a comma list of "
    f"tensorboard, wandb, mlflow, trackio.  {_default(TrainConfig, 'report_to')}",
)
@click.option("--keep", type=int, help=f"Checkpoints kept (the newest).  {_default(TrainConfig, 'keep')}")
@click.option("--seed", type=int, help=f"Random seed (data order, init, samples).  {_default(TrainConfig, 'seed')}")
@click.option(
    "--resume",
    help="For an existing run: latest (continue it), fresh (start over; needs --overwrite if it has checkpoints) "
    f"or a checkpoint directory.  {_default(TrainConfig, 'resume')}",
)
@click.option("--overwrite", is_flag=True, default=None, help="Delete an existing run of the same name and start over.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow model code from the hub repo to run.")
@click.option("--lora", is_flag=True, default=None, help="Train LoRA adapters (peft) instead of all weights.")
@click.option("--lora-r", type=int, help=f"LoRA rank.  {_default(ModelConfig, 'lora_r')}")
@click.option("--lora-alpha", type=int, help=f"LoRA alpha (scale = alpha / r).  {_default(ModelConfig, 'lora_alpha')}")
@click.option("--lora-dropout", type=float, help=f"Dropout on the LoRA path.  {_default(ModelConfig, 'lora_dropout')}")
@click.option("--lora-targets", help="Comma-separated layer names to adapt.  [default: per architecture]")
@click.option("--load-in-4bit", is_flag=True, default=None, help="QLoRA: 4-bit base weights (CUDA + bitsandbytes).")
@click.option(
    "--optimizer", type=click.Choice(choices(TrainConfig, "optimizer")), help=_default(TrainConfig, "optimizer")
)
@click.option(
    "--gradient-checkpointing", is_flag=True, default=None, help="Recompute activations: less memory, ~30% slower."
)
@click.option(
    "--compile/--no-compile", "compile", default=None, help="torch.compile the model.  [default: on with CUDA]"
)
@click.option("--tf32/--no-tf32", default=None, help=f"TF32 matmuls on Ampere+ GPUs.  {_default(TrainConfig, 'tf32')}")
@click.option(
    "--fused-loss/--no-fused-loss",
    default=None,
    help="Chunked cross-entropy, no full fp32 logits.  [default: on with CUDA]",
)
@click.option(
    "--pad-vocab/--no-pad-vocab", default=None, help="Pad embeddings to a multiple of 64.  [default: on with CUDA]"
)
@click.option(
    "--cpu-kernels/--no-cpu-kernels",
    default=None,
    help="Faster GELU, dropout and attention kernels on CPU.  [default: on without CUDA]",
)
@click.option(
    "--loss-sync-every",
    type=int,
    help="Read the loss back every N steps.  "
    f"[default: {LOSS_SYNC_EVERY['cpu']} on CPU, {LOSS_SYNC_EVERY['cuda']} on CUDA]",
)
@click.option("--freeze-layers", type=int, help="Freeze the embeddings and the first N transformer blocks.")
@click.option(
    "--train-only-blocks",
    is_flag=True,
    default=None,
    help="Train only the transformer blocks (gpt-2-simple's only_train_transformer_layers).",
)
@click.option(
    "--dry-run", is_flag=True, help="Print parameters, effective batch and estimated memory per device; train nothing."
)
@click.option("--num-processes", type=int, help="Launch this many training processes through accelerate (one per GPU).")
@click.option("--accelerate-config", help="Launch through accelerate with this config file (see configs/accelerate/).")
def train(data, config_file, dry_run, num_processes, accelerate_config, **flags):
    """Fine-tune a model on text files, directories or globs.

    \b
    Examples:
      finetune train sample_data/recipes.txt --model tiny
      finetune train my_data.txt --model gpt2 --steps 2000 --batch-size 4
      finetune train 'books/*.txt' --config configs/gpu.yaml --run-name books
    \b
    Running the same command again continues the run from its latest checkpoint.
    \b
    Several GPUs (or processes):
      finetune train data.txt --num-processes 4
      finetune train data.txt --accelerate-config configs/accelerate/fsdp.yaml
      accelerate launch -m finetune train data.txt
    """
    _quiet_libraries()
    flags["datasets"] = list(flags["datasets"]) or None
    if flags.get("lora_targets") is not None:
        flags["lora_targets"] = [t.strip() for t in flags["lora_targets"].split(",") if t.strip()]
    options = {key: value for key, value in flags.items() if value is not None}
    command = _command_line("train", list(data), {"config": config_file, **options})
    if num_processes is not None or accelerate_config:
        from finetune.api import train_config
        from finetune.launch import launch_training
        from finetune.runs import launcher_lock

        # The launcher holds the run's lock for the processes it starts (runs.run_lock).
        with launcher_lock(train_config(list(data) or None, config_file, options)):
            code = launch_training(shlex.split(command)[1:], num_processes, accelerate_config)
        sys.exit(code)
    from finetune.api import train as api_train

    if data:
        options["data"] = list(data)
    if dry_run:
        api_train(config=config_file, log=_echo_err, dry_run=True, **options)
        return
    result = api_train(config=config_file, log=_echo_err, command=command, **options)
    if result.exit_code:  # stopped by SIGINT/SIGTERM after saving: 130 / 143, as shells expect
        sys.exit(result.exit_code)


@main.command(context_settings={"show_default": True})
@click.argument("data", nargs=-1)
@data_options
@click.option(
    "--model",
    "-m",
    help=f"The model whose tokenizer to use (hub id, directory, or tiny).  {_default(ModelConfig, 'name')}",
)
@click.option("--output", "-o", required=True, help="Directory to write; `finetune train DIR` reads it.")
@click.option("--config", "config_file", help="YAML config file, or a preset name from configs/.")
def prepare(data, output, config_file, **flags):
    """Tokenize data once into a portable directory (prepare on a laptop, train on a GPU box).

    \b
    Examples:
      finetune prepare chats.jsonl --model gpt2 --output prepared/chats
      finetune train prepared/chats --model gpt2
    """
    _quiet_libraries()
    from finetune.api import prepare as api_prepare

    flags["datasets"] = list(flags["datasets"]) or None
    options = {key: value for key, value in flags.items() if value is not None}
    if data:
        options["data"] = list(data)
    api_prepare(output=output, config=config_file, log=_echo_err, **options)


@main.command(context_settings={"show_default": True})
@click.argument("runs", nargs=-1, required=True)
@click.option(
    "--output",
    "-o",
    help="The image to write (.png, .svg or .pdf).  [default: the run's loss.png for "
    "one run, ./loss-compare.png for several]",
)
@click.option("--runs-dir", default=default(TrainConfig, "runs_dir"), help="Directory holding the runs.")
def plot(runs, output, runs_dir):
    """Draw the loss of one or several runs (on the same axes, to compare them).

    \b
    Examples:
      finetune plot recipes
      finetune plot recipes recipes-lr3e-3 --output compare.png
    \b
    RUN is a run's name under --runs-dir, or a run directory. Training draws runs/<run>/loss.png itself.
    """
    from finetune.loss_plot import plot_runs

    click.echo(plot_runs(list(runs), runs_dir, output))


def _command_line(name: str, arguments: list[str], options: dict) -> str:
    """The command as a user would retype it (recorded in checkpoints and model cards)."""
    words = ["finetune", name, *arguments]
    for key, value in options.items():
        if value is None or value is False:
            continue
        if key == "datasets":  # a repeatable flag
            words += [word for name in value for word in ("--dataset", name)]
            continue
        words.append(f"--{key.replace('_', '-')}")
        if isinstance(value, list):
            words.append(",".join(value))
        elif value is not True:
            words.append(str(value))
    return shlex.join(words)


def _read_prompt_file(path: str) -> list[str]:
    from finetune.files import read_text
    from finetune.generation import SAMPLE_DELIMITER

    text = read_text(path, "prompt file", "convert it to UTF-8 text")
    # Prompts are separated by delimiter lines, wherever they are (first or last line included).
    chunks, current = [], []
    for line in text.splitlines():
        if line.strip() == SAMPLE_DELIMITER:
            chunks.append(current)
            current = []
        else:
            current.append(line)
    chunks.append(current)
    prompts = ["\n".join(chunk).strip("\n") for chunk in chunks if "".join(chunk).strip()]
    if not prompts:
        raise FinetuneError(
            f"prompt file '{path}' is empty; write one prompt (or several, separated by {SAMPLE_DELIMITER} lines)"
        )
    return prompts


@main.command(context_settings={"show_default": True})
@click.option("--run", help="Sample from this run's latest checkpoint.  [default: the most recent run]")
@click.option("--checkpoint", help="Sample from this checkpoint directory.")
@click.option("--model", "-m", help="Sample from a hub id or model directory.")
@click.option("--onnx", "onnx_dir", help="Sample from an ONNX export with ONNX Runtime (no torch needed).")
@click.option("--runs-dir", default=default(TrainConfig, "runs_dir"), help="Directory holding all runs.")
@click.option("--prompt", "-p", "prompts", multiple=True, help="Text to continue; repeat for several prompts.")
@click.option("--prompt-file", help="File with a prompt (several separated by ==================== lines).")
@click.option("--n", "n", type=int, default=default(GenerateConfig, "n"), help="Samples per prompt.")
@click.option("--batch-size", type=int, default=default(GenerateConfig, "batch_size"), help="Samples decoded together.")
@click.option(
    "--max-new-tokens",
    "--length",
    type=int,
    default=default(GenerateConfig, "max_new_tokens"),
    help="Tokens generated per sample.",
)
@click.option(
    "--temperature",
    type=float,
    default=default(GenerateConfig, "temperature"),
    help="Randomness; 0 is greedy (always the likeliest token).",
)
@click.option(
    "--top-k",
    type=int,
    default=default(GenerateConfig, "top_k"),
    help="Sample among the k likeliest tokens; 0 disables.",
)
@click.option(
    "--top-p",
    type=float,
    default=default(GenerateConfig, "top_p"),
    help="Nucleus sampling probability mass; 1 disables.",
)
@click.option(
    "--repetition-penalty",
    type=float,
    default=default(GenerateConfig, "repetition_penalty"),
    help="Above 1 discourages repetition.",
)
@click.option("--seed", type=int, help="Fix the randomness: the same seed gives the same samples.")
@click.option("--stop", multiple=True, help="Cut each sample at this string; repeatable.")
@click.option(
    "--include-prompt/--no-include-prompt",
    default=default(GenerateConfig, "include_prompt"),
    help="Start each sample with its prompt.",
)
@click.option("--output", "-o", help="Append samples to this file (separated by ==================== lines).")
@click.option(
    "--stream/--no-stream", default=None, help="Print tokens as they arrive.  [default: when one sample is asked for]"
)
@click.option(
    "--static-cache/--no-static-cache",
    default=None,
    help="Static KV cache with compiled decoding.  [default: on with CUDA]",
)
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub repo to run.")
def generate(run, checkpoint, model, onnx_dir, runs_dir, prompts, prompt_file, trust_remote_code, **options):
    """Generate text from a trained run, a checkpoint or a model.

    \b
    Examples:
      finetune generate --run recipes --prompt "Title: Lemon" --n 3
      finetune generate --run recipes --temperature 0 --max-new-tokens 100
      finetune generate --checkpoint runs/recipes/checkpoint-000200 -p "Title:" --stop "Title:" -o out.txt
      finetune generate --onnx exports/recipes-onnx --prompt "Title:"
    """
    _quiet_libraries()
    from finetune.api import generate as api_generate
    from finetune.generation import SAMPLE_DELIMITER

    all_prompts = list(prompts)
    if prompt_file:
        all_prompts += _read_prompt_file(prompt_file)
    options["prompts"] = all_prompts or [""]
    output = options.get("output")
    texts = api_generate(
        run=run,
        checkpoint=checkpoint,
        model=model,
        onnx=onnx_dir,
        runs_dir=runs_dir,
        trust_remote_code=trust_remote_code,
        **options,
    )
    streamed = options["stream"] if options["stream"] is not None else len(texts) == 1
    if output:
        _echo_err(f"appended {len(texts)} sample(s) to {output}")
    elif not streamed:
        for text in texts:
            click.echo(text.rstrip("\n"))
            click.echo(SAMPLE_DELIMITER)


@main.command(context_settings={"show_default": True})
@click.option("--run", help="Export this run's latest checkpoint.  [default: the most recent run]")
@click.option("--checkpoint", help="Export this checkpoint directory instead.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(choices(ExportConfig, "format")),
    default=default(ExportConfig, "format"),
    help="Hugging Face directory, or ONNX with a KV cache.",
)
@click.option("--output", "-o", help="Output directory.  [default: exports/<run>-<format>]")
@click.option(
    "--dtype",
    type=click.Choice(choices(ExportConfig, "dtype")),
    default=default(ExportConfig, "dtype"),
    help="Weight precision (ONNX: fp32 or fp16).",
)
@click.option(
    "--quantize",
    type=click.Choice(choices(ExportConfig, "quantize")),
    help="ONNX only: int8 weights (about 1/3 the size, 3-4x transformers' generate speed on CPU).",
)
@click.option(
    "--optimize/--no-optimize",
    default=True,
    help="ONNX only: fuse attention, layer norms and GELU into ONNX Runtime's operators (faster); "
    "--no-optimize keeps standard ONNX operators, for other runtimes.",
)
@click.option("--verify/--no-verify", default=True, help="Check the export against PyTorch (logits and greedy tokens).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--runs-dir", default=default(TrainConfig, "runs_dir"), help="Directory holding all runs.")
def export(run, checkpoint, fmt, output, dtype, quantize, optimize, verify, overwrite, runs_dir):
    """Export a trained model for serving or sharing.

    \b
    Examples:
      finetune export --run recipes --format safetensors --output exports/recipes
      finetune export --run recipes --format onnx
      finetune export --run recipes --format onnx --quantize int8 --output exports/recipes-int8
    """
    _quiet_libraries()
    from finetune.api import export as api_export

    api_export(
        run=run,
        checkpoint=checkpoint,
        format=fmt,
        output=output,
        dtype=dtype,
        quantize=quantize,
        optimize=optimize,
        verify=verify,
        overwrite=overwrite,
        runs_dir=runs_dir,
        log=_echo_err,
    )


@main.command(name="eval", context_settings={"show_default": True})
@click.argument("data", nargs=-1)
@click.option("--run", help="Evaluate this run's latest checkpoint, with the run's tokenizer and data settings.")
@click.option("--checkpoint", help="Evaluate this checkpoint directory.")
@click.option("--model", "-m", help="Evaluate a hub id or model directory.")
@click.option("--onnx", "onnx_dir", help="Evaluate an ONNX export with ONNX Runtime (no torch needed).")
@click.option("--baseline", help="Also evaluate this model (with --onnx: this export) and print the change.")
@click.option("--all-checkpoints", is_flag=True, help="With --run: every checkpoint, a table and a plot by step.")
@click.option(
    "--block-size", type=int, help="Tokens per window.  [default: the run's block size, else min(1024, context)]"
)
@click.option("--stride", type=int, help="Tokens between window starts (< block size: more context per token).  "
              "[default: the block size]")  # fmt: skip
@click.option("--batch-size", type=int, default=8, help="Windows scored together.")
@click.option("--json", "json_file", help="Also write the figures to this JSON file, for scripts.")
@click.option("--runs-dir", default=default(TrainConfig, "runs_dir"), help="Directory holding all runs.")
@click.option("--line-by-line/--no-line-by-line", default=None, help="Each non-empty line is a document.")
@click.option("--encoding", help="Text encoding of the data files.  [default: the run's, else utf-8]")
@click.option("--format", "format", type=click.Choice(FORMATS), help="Data format.  [default: from the extension]")
@click.option("--text-field", "--text-column", "text_field", help="Field/column with the text of plain records.")
@click.option("--cache-dir", help="Tokenized-data cache.  [default: $FINETUNE_CACHE or ~/.cache/finetune]")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub repo to run.")
def evaluate(data, onnx_dir, json_file, **options):
    """Perplexity of a model on your data, read exactly as training reads it.

    \b
    Examples:
      finetune eval held_out.txt --run recipes --baseline gpt2
      finetune eval held_out.txt --run recipes --all-checkpoints
      finetune eval held_out.txt --model gpt2 --stride 512
      finetune eval held_out.txt --onnx exports/recipes-onnx-int8 --baseline exports/recipes-onnx --json eval.json
    """
    _quiet_libraries()
    from finetune.api import evaluate as api_evaluate

    report = api_evaluate(list(data), onnx=onnx_dir, json_file=json_file, log=_echo_err, **options)
    for line in report.lines():
        click.echo(line)
    if json_file:
        _echo_err(f"wrote {json_file}")


@main.command(context_settings={"show_default": True})
@click.option("--run", help="Serve this run's latest checkpoint.  [default: the most recent run]")
@click.option("--checkpoint", help="Serve this checkpoint directory.")
@click.option("--model", "-m", help="Serve a hub id or model directory.")
@click.option("--onnx", "onnx_dir", help="Serve an ONNX export with ONNX Runtime (no torch needed).")
@click.option("--runs-dir", default=default(TrainConfig, "runs_dir"), help="Directory holding all runs.")
@click.option("--host", default=default(ServeConfig, "host"), help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=default(ServeConfig, "port"), help="Port to listen on (0: any free port).")
@click.option("--model-name", help="The model name clients send.  [default: the run's or directory's name]")
@click.option(
    "--api-key",
    envvar="FINETUNE_API_KEY",
    help="Require 'Authorization: Bearer KEY' (or set FINETUNE_API_KEY).  [default: no key needed]",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=default(ServeConfig, "max_batch_size"),
    help="Requests decoded together.",
)
@click.option(
    "--max-queue",
    type=int,
    default=default(ServeConfig, "max_queue"),
    help="Requests waiting beyond the batch; more get 429.",
)
@click.option(
    "--max-tokens",
    type=int,
    help="New tokens when a request does not say.  " + _saved_or(GenerateConfig, "max_new_tokens"),
)
@click.option(
    "--temperature",
    type=float,
    help="Randomness when a request does not say; 0 is greedy.  " + _saved_or(GenerateConfig, "temperature"),
)
@click.option("--top-k", type=int, help="Default top-k; 0 disables.  " + _saved_or(GenerateConfig, "top_k"))
@click.option("--top-p", type=float, help="Default top-p; 1 disables.  " + _saved_or(GenerateConfig, "top_p"))
@click.option(
    "--grace",
    type=float,
    default=default(ServeConfig, "shutdown_grace_s"),
    help="Seconds in-flight requests get to finish on SIGTERM/Ctrl-C.",
)
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub repo to run.")
@click.option(
    "--replicas",
    type=int,
    help="Serve N replicas on Ray Serve (the ray extra), each loading the model.  [default: one process, no Ray]",
)
@click.option("--max-replicas", type=int, help="With --replicas: autoscale between --replicas and this many.")
@click.option("--ray-address", help="With --replicas: join this Ray cluster.  [default: start a local Ray instance]")
def serve(run, checkpoint, model, onnx_dir, runs_dir, host, port, model_name, api_key, **options):
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming).

    \b
    Examples:
      finetune serve --run recipes
      finetune serve --onnx exports/recipes-onnx --port 8080 --max-batch-size 16
      finetune serve --run recipes --replicas 2 --max-replicas 8
      curl localhost:8000/v1/completions -d '{"prompt": "Title:", "max_tokens": 40}'
    """
    _quiet_libraries()
    from finetune.serving.launch import serve_command

    serve_command(
        run=run,
        checkpoint=checkpoint,
        model=model,
        onnx=onnx_dir,
        runs_dir=runs_dir,
        host=host,
        port=port,
        model_name=model_name,
        api_key=api_key,
        log=_echo_err,
        **options,
    )


@main.command("runs", context_settings={"show_default": True})
@click.argument("name", required=False)
@click.option("--runs-dir", default=default(TrainConfig, "runs_dir"), help="Directory holding all runs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of the table.")
def runs_command(name, runs_dir, as_json):
    """List the runs (steps, status, validation perplexity, last checkpoint, size), or show one run.

    \b
    Examples:
      finetune runs
      finetune runs recipes
      finetune runs --json
    """
    import json

    from finetune import run_listing
    from finetune.api import list_runs

    found = list_runs(name, runs_dir=runs_dir)
    if as_json:
        click.echo(json.dumps(run_listing.to_json(found), indent=1))
    else:
        click.echo(run_listing.detail_text(found) if name else run_listing.table(found))


if __name__ == "__main__":
    main()
