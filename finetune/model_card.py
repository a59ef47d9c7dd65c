"""The model card: the README.md of every export (what it was trained from and on, how well, how to load it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from finetune.errors import DISTRIBUTION, FinetuneError
from finetune.perplexity import change_line, perplexity


def model_card(run_dir: Optional[Path], source: Path, fmt: str, dtype: str, fused: bool = False) -> str:
    """README.md for the export: what it was trained from and on, how well, and how to load it."""
    from finetune.exporting import MANIFEST, ONNX_FILE  # (exporting imports this module)
    from finetune.run_state import TrainingState

    state = TrainingState.read_optional(str(source))
    config = state.config if isinstance(state.config, dict) else {}
    if not config and run_dir is not None and (run_dir / "config.yaml").is_file():
        from finetune.config import load_yaml

        config = load_yaml(run_dir / "config.yaml")
    base = _field(config, "model").get("name", "unknown")
    data = _field(config, "data")
    val_loss = state.val_loss if isinstance(state.val_loss, (int, float)) else None
    paths = data.get("paths") if isinstance(data.get("paths"), list) else []
    lines = [
        f"# {run_dir.name if run_dir else source.name}",
        "",
        f"A causal language model fine-tuned with [finetune](https://pypi.org/project/{DISTRIBUTION}/), "
        f"exported as {fmt} ({dtype}).",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{base}` |",
        f"| training data | {', '.join(f'`{Path(str(p)).name}`' for p in paths) or 'unknown'} |",
        f"| block size | {data.get('block_size', 'unknown')} tokens |",
        f"| steps | {'unknown' if state.step is None else state.step} |",
        f"| tokens seen | {state.tokens_seen:,} |"
        if isinstance(state.tokens_seen, int)
        else "| tokens seen | unknown |",
    ]
    if val_loss is not None:
        lines.append(f"| final validation loss | {val_loss:.4f} (perplexity {perplexity(val_loss):.2f}) |")
        before_after = change_line(_initial_val_loss(run_dir), val_loss)
        if before_after:
            lines.append(f"| before → after fine-tuning | {before_after} |")
    if state.command:
        lines.append(f"| command | `{state.command}` |")
    lines += ["", "## Load it", ""]
    if fmt == "safetensors":
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
            "```",
            "",
            'or sample from it: `finetune generate --model path/to/this/directory --prompt "..."`.',
        ]
    else:
        lines += [
            f"`{ONNX_FILE}` is a decoder with a KV cache; `{MANIFEST}` names its inputs, outputs, shapes and",
            "special token ids."
            + (
                " It uses ONNX Runtime's fused operators (domain com.microsoft), so it needs ONNX"
                " Runtime; `finetune export --no-optimize` writes standard ONNX operators only."
                if fused
                else ""
            ),
            "Sample from it without torch (onnxruntime, numpy and tokenizers only):",
            "",
            '    finetune generate --onnx path/to/this/directory --prompt "..."',
            "",
            "`verification.json` holds the parity check against PyTorch made at export time.",
        ]
    return "\n".join(lines) + "\n"


def _initial_val_loss(run_dir: Optional[Path]) -> Optional[float]:
    """The run's validation loss before training (metrics.jsonl, step 0); None when unknown or unreadable."""
    from finetune import metrics

    if run_dir is None:
        return None
    try:
        return metrics.initial_val_loss(run_dir / metrics.FILE_NAME)
    except FinetuneError:  # a damaged metrics file costs the card one line, not the export
        return None


def _field(config: dict, section: str) -> dict:
    """A section of a run's config, {} where a hand-edited file holds something else."""
    value = config.get(section) if isinstance(config, dict) else None
    return value if isinstance(value, dict) else {}
