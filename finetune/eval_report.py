"""What `finetune eval` prints and writes: one line per model, the change against a baseline, the table of a
run's checkpoints with the best marked, the plot of perplexity by step, and the JSON for scripts."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from finetune import files
from finetune.perplexity import Score, change_line, shown


@dataclass
class Figures:
    """One model's result on the data."""

    label: str  # the model as the user named it (a checkpoint directory, a hub id, an export)
    score: Score
    step: Optional[int] = None  # a checkpoint's training step

    def line(self) -> str:
        s = self.score
        return f"perplexity {shown(s.perplexity)}, loss {s.loss:.4f} nats/token over {s.tokens:,} tokens"

    def to_json(self) -> dict:
        return {
            "model": self.label,
            "step": self.step,
            "loss": round(self.score.loss, 6),
            "perplexity": round(self.score.perplexity, 4),
            "tokens": self.score.tokens,
        }


@dataclass
class EvalReport:
    data: list[str]
    described: str  # "recipes.txt: 29,435 tokens"
    block_size: int
    stride: Optional[int]  # None for supervised examples (one row each)
    model: Figures  # the model asked for (with --all-checkpoints: the latest checkpoint)
    baseline: Optional[Figures] = None
    checkpoints: list[Figures] = field(default_factory=list)  # --all-checkpoints, oldest first
    skipped: list[str] = field(default_factory=list)  # checkpoints that could not be read, with why
    plot: Optional[Path] = None

    @property
    def best(self) -> Optional[Figures]:
        return min(self.checkpoints, key=lambda f: f.score.loss) if self.checkpoints else None

    def lines(self) -> list[str]:
        windows = f"windows of {self.block_size} tokens" + (
            f", stride {self.stride}" if self.stride and self.stride != self.block_size else ""
        )
        lines = [f"data: {self.described} ({windows if self.stride else 'one example per row'})"]
        if self.checkpoints:
            lines += self.table()
        else:
            lines.append(f"{self.model.label}: {self.model.line()}")
        if self.baseline is not None:
            lines.append(f"{self.baseline.label} (baseline): {self.baseline.line()}")
            lines.append(
                change_line(self.baseline.score.loss, self.model.score.loss, "perplexity") + " against the baseline"
            )
        if self.plot is not None:
            lines.append(f"plot: {self.plot}")
        return lines

    def table(self) -> list[str]:
        best = self.best
        rows = ["  step      loss  perplexity"]
        for f in self.checkpoints:
            mark = "  <- best" if f is best else ""
            rows.append(f"{f.step:>6}  {f.score.loss:8.4f}  {shown(f.score.perplexity):>10}{mark}")
        rows += [f"skipped {reason}" for reason in self.skipped]
        rows.append(f"best: {best.label} (step {best.step}), perplexity {shown(best.score.perplexity)}")
        return rows

    def to_json(self) -> dict:
        best = self.best
        return {
            "data": self.data,
            "block_size": self.block_size,
            "stride": self.stride,
            "model": self.model.to_json(),
            "baseline": self.baseline.to_json() if self.baseline else None,
            "relative_change": (
                round(self.model.score.perplexity / self.baseline.score.perplexity - 1, 6) if self.baseline else None
            ),
            "checkpoints": [f.to_json() for f in self.checkpoints] or None,
            "best_step": best.step if best else None,
        }


def write_json(report: EvalReport, path: Path) -> None:
    files.write_atomic(path, json.dumps(report.to_json(), indent=1) + "\n", "eval JSON file")


def draw_checkpoints(report: EvalReport, run_name: str, path: Path) -> None:
    """Perplexity by step, the best checkpoint marked: where the curve turns up, training began to overfit."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [f.step for f in report.checkpoints]
    values = [f.score.perplexity for f in report.checkpoints]
    best = report.best
    figure = Figure(figsize=(7, 4.2), dpi=120)
    axes = figure.subplots()
    axes.plot(steps, values, marker="o", color="tab:blue", label="perplexity of each checkpoint")
    best_label = f"best: step {best.step}, perplexity {shown(best.score.perplexity)}"
    axes.scatter(
        [best.step], [best.score.perplexity], s=160, c="none", edgecolors="tab:red", zorder=3, label=best_label
    )
    if report.baseline is not None:
        baseline = report.baseline
        baseline_label = f"baseline {baseline.label}: {shown(baseline.score.perplexity)}"
        axes.axhline(baseline.score.perplexity, color="gray", linestyle="--", label=baseline_label)
    names = ", ".join(Path(d).name for d in report.data[:2]) + (" ..." if len(report.data) > 2 else "")
    axes.set_title(f"Run '{run_name}': perplexity on {names} by checkpoint")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes.set_xlabel("training step (optimizer steps)")
    axes.set_ylabel("perplexity (lower is better)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    files.write_atomic(path, buffer.getvalue(), "perplexity plot")
