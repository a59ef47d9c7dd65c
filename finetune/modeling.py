"""Models and tokenizers: load them by hub id or local path (every file checked first), or build a
from-scratch preset (its tokenizer is learned in learned_tokenizer.py); which parameters train (freezing)
and how many there are; and the libraries' own warnings and progress bars kept quiet."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlparse

from finetune.errors import FinetuneError, install_hint
from finetune.files import read_json, reading, short

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from finetune.config import RunConfig

EOS = "<|endoftext|>"

# Small architectures trained from scratch with a tokenizer learned from the user's data. They run
# offline and learn the *form* of a small corpus in minutes on a laptop CPU.
SCRATCH_MODELS = {
    "tiny": dict(
        model_type="gpt2",
        vocab_size=4096,
        n_positions=512,
        n_embd=256,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    ),
    "tiny-llama": dict(
        model_type="llama",
        vocab_size=4096,
        max_position_embeddings=512,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def quiet_transformers() -> None:
    """No weight-loading progress bars or advice lines between a user's samples."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# Libraries whose warnings a user of `finetune` cannot act on (the CLI ignores them the same way).
NOISY_MODULES = r"(torch|accelerate|onnxscript|onnx_ir|onnxruntime|transformers|peft)(\..*)?"


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """For the Python API: the CLI's quiet (no library warnings, no progress bars) for one call.

    Library warnings are ignored inside the block only. transformers is not imported here (the ONNX
    path runs without it): its logging drops to errors when a model loads (quiet_transformers), and
    a level the caller had set before the call is restored after it.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=NOISY_MODULES)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*treespec.*")
        previous = os.environ.get("TRANSFORMERS_VERBOSITY")
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers is first imported
        transformers = sys.modules.get("transformers")
        verbosity = transformers.logging.get_verbosity() if transformers else None
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TRANSFORMERS_VERBOSITY", None)
            else:
                os.environ["TRANSFORMERS_VERBOSITY"] = previous
            if verbosity is not None:
                transformers.logging.set_verbosity(verbosity)


def is_scratch_preset(name: str) -> bool:
    """`--model tiny` names the from-scratch preset unless ./tiny is a model directory (holds config.json).

    A path (`./tiny`, `/models/tiny`) is always a directory: preset names have no slash. When a
    directory shares a preset's name, a warning says which one was used and how to pick the other.
    """
    if name not in SCRATCH_MODELS:
        return False
    here = Path(name)
    if (here / "config.json").is_file():
        _warn_once(
            f"--model {name}: using the model directory ./{name} (it holds config.json), not the from-scratch "
            f"preset '{name}'; rename the directory to train the preset"
        )
        return False
    if here.exists():
        _warn_once(
            f"--model {name}: using the from-scratch preset '{name}'; ./{name} is not a model directory "
            f"(no config.json)"
        )
    return True


def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, UserWarning, stacklevel=3)  # shown once per message; the CLI prints it as one line


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A fast check, so an offline machine fails in seconds instead of minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_kwargs(name: str, trust_remote_code: bool) -> dict:
    kwargs = {"trust_remote_code": trust_remote_code}
    if not Path(name).exists() and not _hub_reachable():
        kwargs["local_files_only"] = True
    return kwargs


def _load_error(name: str, exc: Exception) -> FinetuneError:
    if is_scratch_preset(name):
        return FinetuneError(
            f"'{name}' is a from-scratch preset for `finetune train`, with no trained weights; "
            f"sample from a trained run with --run NAME, or pass a model directory"
        )
    if Path(name).exists():
        return FinetuneError(
            f"'{name}' is not a loadable model directory ({short(exc)}); it needs config.json and weights"
        )
    if name.startswith((".", "/", "~")) or os.sep in name.rstrip("/") and name.count("/") > 1:
        return FinetuneError(f"model directory '{name}' does not exist; check the path")
    return FinetuneError(
        f"could not load model '{name}' from the Hugging Face Hub (no network, or no such model) "
        f"and it is not in the local cache; pass a local directory with --model PATH, "
        f"or --model tiny to train from scratch"
    )


# ---------------------------------------------------------------------------------------------
# A local model directory, checked file by file before transformers reads it
# ---------------------------------------------------------------------------------------------
# transformers reports a bad file as a bare JSONDecodeError, KeyError or TypeError without its name,
# or silently falls back to defaults (a garbage generation_config.json is ignored; a config with one
# layer more than the weights gets a random layer). So every file is read here first, through
# finetune.files, and what transformers loaded is checked afterwards.

# The JSON files transformers, tokenizers or peft may read: name -> (what it is, keys it must hold).
MODEL_JSON_FILES = {
    "config.json": ("model config", ()),
    "generation_config.json": ("generation config", ()),
    "adapter_config.json": ("LoRA adapter config", ("base_model_name_or_path",)),
    "model.safetensors.index.json": ("weights index", ("weight_map",)),
    "tokenizer.json": ("tokenizer file", ("model",)),
    "tokenizer_config.json": ("tokenizer file", ()),
    "special_tokens_map.json": ("tokenizer file", ()),
    "added_tokens.json": ("tokenizer file", ()),
    "vocab.json": ("tokenizer file", ()),
}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
PICKLED_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")


def local_model_dir(name: str) -> Optional[Path]:
    """The directory `name` refers to, or None for a hub id or a from-scratch preset."""
    path = Path(name).expanduser()
    if is_scratch_preset(name) or not path.exists():
        return None
    if not path.is_dir():
        raise FinetuneError(f"model path {name} is a file; pass the directory that holds config.json and the weights")
    return path


def file_fix(directory: Path) -> str:
    """What to do about a bad file, by the kind of directory that holds it."""
    from finetune.checkpoint import CHECKPOINT_RE, STATE_DIR

    if CHECKPOINT_RE.match(directory.name) or (directory / STATE_DIR).is_dir():
        return f"use an earlier checkpoint (--checkpoint {directory.parent}/checkpoint-NNNNNN)"
    return "replace it (download or export the model again)"


def check_model_files(directory: Path) -> str:
    """Parse every JSON file of a local model (or tokenizer) directory; returns the fix to quote.

    A run directory (or the runs directory) passed where a model is expected is named as such.
    """
    from finetune.runs import misplaced_run_dir

    problem = misplaced_run_dir(directory)
    if problem:
        raise FinetuneError(problem)
    from finetune.exporting import MANIFEST as ONNX_MANIFEST

    if (directory / ONNX_MANIFEST).exists() and not any(directory.glob("*.safetensors")):
        raise FinetuneError(
            f"{directory} is an ONNX export, not a PyTorch model; sample from it with --onnx {directory}"
        )
    fix = file_fix(directory)
    for name, (what, required) in MODEL_JSON_FILES.items():
        path = directory / name
        if path.exists():
            read_json(path, what, fix, required=required)
    return fix


def require_model_files(directory: Path) -> str:
    """A model directory with a config and safetensors weights (never a pickle); returns the fix to quote."""
    fix = check_model_files(directory)
    if not (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise FinetuneError(
            f"{directory} has no config.json, so it is not a model directory; pass the directory "
            f"that holds config.json and model.safetensors"
        )
    if not any(directory.glob("*.safetensors")):
        pickles = [directory / n for n in PICKLED_WEIGHTS if (directory / n).is_file()] + sorted(
            directory.glob("pytorch_model-*.bin")
        )
        if pickles:
            raise FinetuneError(_pickle_message(directory, pickles[0]))
        raise FinetuneError(f"{directory} has no weights (model.safetensors); {fix}")
    return fix


def _pickle_message(directory: Path, pickle: Path) -> str:
    if pickle.name.startswith("adapter"):
        convert = (
            f"import torch, safetensors.torch as s; s.save_file(torch.load('{pickle}', weights_only=False), "
            f"'{directory / 'adapter_model.safetensors'}')"
        )
    else:
        convert = (
            f"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{directory}', "
            f"use_safetensors=False, weights_only=False).save_pretrained('{directory}')"
        )
    return (
        f"the weights in {directory} exist only as {pickle.name}, a Python pickle, which finetune does not load "
        f"(unpickling can run any code); only if you trust the file, convert it to safetensors with: "
        f'python -c "{convert}"'
    )


def _tokenizer_files(directory: Path) -> str:
    names = [n for n in (*TOKENIZER_FILES, "tokenizer_config.json") if (directory / n).is_file()]
    return ", ".join(names) or "no tokenizer files"


def _load_local_tokenizer(directory: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    fix = check_model_files(directory)
    if (directory / "config.json").is_file():  # AutoTokenizer reads it too, and would not name it
        load_model_config(str(directory), trust_remote_code)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FinetuneError(
            f"{directory} has no tokenizer (tokenizer.json); copy the tokenizer files of the model "
            f"it was trained from into it, or {fix}"
        )
    if (
        directory / "tokenizer.json"
    ).is_file():  # parsed by the tokenizers library itself, so its complaint names this file
        from tokenizers import Tokenizer

        with reading(directory / "tokenizer.json", "tokenizer file", fix):
            Tokenizer.from_file(str(directory / "tokenizer.json"))
    with reading(directory, f"tokenizer ({_tokenizer_files(directory)}) in", fix):
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if not tokenizer("a", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer rather than fail on some bad files: every text encodes to nothing
        raise FinetuneError(f"the tokenizer in {directory} ({_tokenizer_files(directory)}) has no vocabulary; {fix}")
    settings = directory / "tokenizer_config.json"
    if tokenizer.eos_token_id is None or not settings.is_file():
        # It names the special tokens: without it transformers guesses them from the model type, and
        # without an end-of-text token documents cannot be separated and samples never stop.
        why = "is missing" if not settings.is_file() else "names no eos_token"
        raise FinetuneError(
            f"the tokenizer in {directory} is incomplete: {settings} {why} (it names the end-of-text "
            f"and other special tokens); {fix}"
        )
    return tokenizer


def load_tokenizer(name: str, trust_remote_code: bool = False, finish: bool = True) -> PreTrainedTokenizerBase:
    """A model's tokenizer; `finish` readies it for batched generation (left padding, a pad token)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    directory = local_model_dir(name)
    if directory is not None:
        tokenizer = _load_local_tokenizer(directory, trust_remote_code)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **_hub_kwargs(name, trust_remote_code))
        except (OSError, ValueError) as exc:
            raise _load_error(name, exc) from None
    return finish_tokenizer(tokenizer) if finish else tokenizer


def finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Padding for batched generation: decoder-only models pad on the left, with EOS if no pad."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def declared_context(config: PretrainedConfig) -> Optional[int]:
    """The longest sequence the model's config declares it takes; None when it declares none."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def context_length(config) -> int:
    """The model's context, for sizing training blocks: 1024 when its config declares none."""
    return declared_context(config) or 1024


def load_model_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    from transformers import AutoConfig

    if is_scratch_preset(name):
        return scratch_config(name, vocab_size=SCRATCH_MODELS[name]["vocab_size"])
    directory = local_model_dir(name)
    if directory is not None:
        fix = check_model_files(directory)
        if not (directory / "config.json").is_file():
            raise FinetuneError(
                f"{directory} has no config.json, so it is not a model directory; pass the directory "
                f"that holds config.json and model.safetensors"
            )
        try:
            return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        except FinetuneError:
            raise
        except Exception as exc:  # a field of the wrong type or value: transformers' validation names it
            detail = " ".join(str(exc).split())
            raise FinetuneError(
                f"model config {directory / 'config.json'} is not a valid model config "
                f"({detail[:200] or type(exc).__name__}); correct that field, or {fix}"
            ) from None
    try:
        return AutoConfig.from_pretrained(name, **_hub_kwargs(name, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None


def scratch_config(preset: str, vocab_size: int, eos_id: int = 0) -> PretrainedConfig:
    from transformers import AutoConfig

    spec = dict(SCRATCH_MODELS[preset])
    model_type = spec.pop("model_type")
    spec["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, **spec)


def new_run_tokenizer(cfg: RunConfig, files: list[Path]) -> PreTrainedTokenizerBase:
    """The tokenizer a new run (or `finetune prepare`) uses: learned from the data for a from-scratch
    preset, else the model's own."""
    if is_scratch_preset(cfg.model.name):
        from finetune.learned_tokenizer import tokenizer_from_data

        return tokenizer_from_data(cfg, files)
    return load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)


def build_scratch_model(preset: str, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    config = scratch_config(preset, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_pretrained_model(
    name: str,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    load_in_4bit: bool = False,
    fix: Optional[str] = None,
) -> PreTrainedModel:
    """A pretrained model whose weights match its config and hold only finite numbers.

    `fix` replaces the advice quoted when the weights are unusable (resuming suggests an earlier checkpoint).
    """
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    directory = local_model_dir(name)
    if directory is not None:
        local_fix = require_model_files(directory)
        kwargs = {"trust_remote_code": trust_remote_code, "config": load_model_config(name, trust_remote_code)}
    else:
        local_fix = "pass another --model"
        kwargs = _hub_kwargs(name, trust_remote_code)
    if load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config()
    try:
        # Mismatched shapes are loaded (randomly initialised) and refused below, naming the tensor.
        model, info = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=not load_in_4bit, **kwargs
        )
    except FinetuneError:
        raise
    except Exception as exc:  # a library's complaint about the files or their contents
        if directory is None and isinstance(exc, (OSError, ValueError)):
            raise _load_error(name, exc) from None
        raise FinetuneError(
            f"the weights of {directory or name} cannot be loaded ({short(exc)}); {fix or local_fix}"
        ) from None
    where = directory if directory is not None else name
    fix = fix or local_fix
    if not load_in_4bit:
        _require_weights_match_config(info, where, fix)
    require_finite(model, where, fix)
    return model


def load_model_and_tokenizer(
    source: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False, finish: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A checkpoint, model directory or hub id for sampling or export, checked file by file.

    A LoRA checkpoint comes back merged into its base model: a plain, fast transformers model.
    """
    from finetune import checkpoint, lora

    directory = local_model_dir(source)
    if directory is not None:
        require_model_files(directory)
        checkpoint.verify_checkpoint(directory, for_resume=False)  # truncated safetensors files
    tokenizer = load_tokenizer(source, trust_remote_code, finish=finish)
    if directory is not None and lora.is_adapter_checkpoint(directory):
        model = lora.load_merged(directory, dtype, trust_remote_code)
    else:
        model = load_pretrained_model(source, trust_remote_code, dtype=dtype)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # token ids past the embedding table crash sampling with an IndexError
        where = directory if directory is not None else source
        raise FinetuneError(
            f"the tokenizer of {where} has {len(tokenizer)} tokens but the model only {rows} embeddings: "
            f"they do not belong together; restore the tokenizer files saved with these weights"
        )
    return model, tokenizer


def _require_weights_match_config(info: dict, where, fix: str) -> None:
    """Weights missing from the files, or of another shape than config.json says: the two disagree.

    transformers would fill the gaps with random numbers, which samples as fluent nonsense.
    """
    problems = []
    for name, in_weights, by_config in info.get("mismatched_keys") or ():
        problems.append(f"{name} is {list(in_weights)} in the weights but {list(by_config)} by the config")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        problems.append(f"{len(missing)} tensor(s) the config calls for are not in the weights ({missing[0]}, ...)")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) in the weights have no place in the config ({unexpected[0]}, ...)"
        )
    if problems:
        config = Path(where) / "config.json" if Path(where).is_dir() else f"the config of {where}"
        raise FinetuneError(
            f"the weights and {config} disagree: {problems[0]}; "
            f"restore the config.json saved with these weights, or {fix}"
        )


def require_finite(
    model: torch.nn.Module, where, fix: str, weights_file: Optional[Callable[[str], str]] = None
) -> None:
    """Refuse weights holding NaN or inf: they sample garbage or crash deep inside sampling."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            file = weights_file(name) if weights_file else _weights_file(where, name)
            raise FinetuneError(f"the weights in {file} hold NaN/inf (in {name}: training diverged); {fix}")


def _weights_file(where, tensor: str) -> str:
    """The safetensors file of `where` holding `tensor` (the shard, for a sharded model)."""
    directory = Path(where)
    if not directory.is_dir():
        return str(where)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shard = read_json(index, "weights index").get("weight_map", {}).get(tensor)
        if shard:
            return str(directory / shard)
    single = sorted(directory.glob("*.safetensors"))
    return str(single[0]) if len(single) == 1 else str(directory)


def _four_bit_config():
    """QLoRA's NF4 base weights with bf16 compute; needs a CUDA GPU and bitsandbytes."""
    import torch

    if not torch.cuda.is_available():
        raise FinetuneError("--load-in-4bit (QLoRA) needs a CUDA GPU; on this machine train with --lora alone")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FinetuneError(f"--load-in-4bit needs bitsandbytes; install it with: {install_hint('qlora')}") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def transformer_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks (model.transformer.h, model.model.layers, ...)."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise FinetuneError(
        f"cannot find the transformer blocks of this '{model.config.model_type}' model to freeze; "
        f"drop --freeze-layers / --train-only-blocks"
    )


def freeze_parameters(model: PreTrainedModel, freeze_layers: int, train_only_blocks: bool) -> None:
    """--freeze-layers N: embeddings and the first N blocks stop training.
    --train-only-blocks: only the transformer blocks train (embeddings, final norm and head are frozen),
    like gpt-2-simple's only_train_transformer_layers. A tied output layer shares the embeddings' fate."""
    import torch

    blocks = transformer_blocks(model) if (freeze_layers or train_only_blocks) else None
    if train_only_blocks:
        model.requires_grad_(False)
        blocks.requires_grad_(True)
    if freeze_layers:
        if freeze_layers > len(blocks):
            raise FinetuneError(f"--freeze-layers {freeze_layers} exceeds the model's {len(blocks)} blocks")
        block_params = {id(p) for p in blocks.parameters()}
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) and not any(id(p) in block_params for p in module.parameters()):
                module.requires_grad_(False)
        for block in blocks[:freeze_layers]:
            block.requires_grad_(False)


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
