"""The loss plot: runs/<run>/loss.png during training, and `finetune plot RUN [RUN ...]` to compare runs.

Everything is drawn from metrics.jsonl, which holds the run's whole history (a resume cuts it back to
the checkpoint's step and appends), so the step axis continues across resumes. The top panel shows
the training loss raw (thin, light) and smoothed (an exponential moving average), and the validation
loss as points joined by a line; the bottom panel the learning rate.

During training a helper process draws (`LossPlotter`): the training loop only writes a newline to
its stdin at each evaluation, so a step never waits for matplotlib (nor for the GIL it would hold
in a thread). It spaces its drawings so that drawing takes at most DRAWING_SHARE of the time: on a
2-core machine a drawing at every one of frequent evaluations took 14% of training's speed. Closing
its stdin asks for the last drawing, which `close` waits for. A plot that
fails never stops training: the first failure is reported once and the helper stops.

matplotlib (Agg, through matplotlib.figure.Figure: no pyplot state) is imported only to draw.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional

from finetune import files, metrics
from finetune.errors import FinetuneError
from finetune.perplexity import perplexity

PLOT_NAME = "loss.png"
COMPARE_NAME = "loss-compare.png"
FORMATS = (".png", ".svg", ".pdf")
CLOSE_TIMEOUT_S = 120  # the last drawing of a long run takes about a second; this only bounds a hung helper


@dataclass
class Series:
    """One run's curves, read from its metrics.jsonl (one point per step, the last record winning)."""

    name: str
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.train_steps and not self.val_steps


def read_series(run_dir: Path) -> Series:
    """The run's curves. A torn last line (a crash mid-write) is left out; another damaged line is an error."""
    path = run_dir / metrics.FILE_NAME
    series = Series(run_dir.name)
    if not path.is_file():
        return series
    train: dict[int, tuple[float, float]] = {}
    val: dict[int, float] = {}
    for record in metrics.read(path):
        step = record.get("step")
        if not isinstance(step, int):
            continue
        if _finite(record.get("loss")) and _finite(record.get("lr")):
            train[step] = (record["loss"], record["lr"])
        if _finite(record.get("val_loss")):
            val[step] = record["val_loss"]
        elif step == 0 and _finite(record.get(metrics.INITIAL_VAL_LOSS)):  # before training: the first point
            val[step] = record[metrics.INITIAL_VAL_LOSS]
    for step in sorted(train):
        series.train_steps.append(step)
        series.train_loss.append(train[step][0])
        series.lr.append(train[step][1])
    series.val_steps = sorted(val)
    series.val_loss = [val[step] for step in series.val_steps]
    return series


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def smoothed(values: list[float]) -> list[float]:
    """TensorBoard's debiased exponential moving average over about a twentieth of the points (at least 3):
    enough to show the trend through noisy steps, little enough to follow a falling loss closely."""
    span = max(3.0, len(values) / 20)
    weight = 1 - 2 / (span + 1)
    out, last = [], 0.0
    for i, value in enumerate(values):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight ** (i + 1)) if weight else value)
    return out


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
VAL_COLOR = "#ff7f0e"  # one run: validation in orange beside the blue training loss


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.5), dpi=110, layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    loss_ax.set_ylabel("loss (nats/token)")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss_ax, lr_ax):
        ax.grid(True, alpha=0.3)
    return fig, loss_ax, lr_ax


def _draw_series(loss_ax, lr_ax, series: Series, color: str, val_color: str, label: str) -> None:
    if series.train_steps:
        loss_ax.plot(
            series.train_steps,
            series.train_loss,
            color=color,
            alpha=0.3,
            linewidth=0.8,
            # Compared runs name only their smoothed and validation curves: the subtitle explains the raw ones.
            label="training (raw)" if not label else "_nolegend_",
        )
        loss_ax.plot(
            series.train_steps,
            smoothed(series.train_loss),
            color=color,
            linewidth=2,
            label=f"{label}training (smoothed)",
        )
        lr_ax.plot(series.train_steps, series.lr, color=color, linewidth=1.5, label=label.rstrip(": ") or None)
    if series.val_steps:
        loss_ax.plot(
            series.val_steps,
            series.val_loss,
            color=val_color,
            linestyle="--",
            marker="o",
            markersize=5,
            linewidth=1.5,
            label=f"{label}validation",
        )


def _summary(series: Series) -> str:
    """The last numbers, for the title: what a glance at the plot should tell."""
    parts = []
    if series.train_steps:
        parts.append(f"step {series.train_steps[-1]}, training loss {series.train_loss[-1]:.3f}")
    if series.val_steps:
        best = min(series.val_loss)
        parts.append(
            f"validation loss {series.val_loss[-1]:.3f} (perplexity {perplexity(series.val_loss[-1]):.1f}; "
            f"best {best:.3f})"
        )
    return "; ".join(parts)


def _loss_scale(loss_ax, all_series: list[Series]) -> None:
    """A log scale once the loss spans more than a factor of 4 (a from-scratch run falls from ~7 to ~1):
    the late, small improvements stay visible. Ticks are written as plain numbers, not powers of ten."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    values = [v for s in all_series for v in s.train_loss + s.val_loss if v > 0]
    if not values or max(values) / min(values) <= 4:
        return
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss (nats/token, log scale)")
    loss_ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0, 7.0)))
    loss_ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(1.5, 4.0, 6.0, 8.0)))
    loss_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    loss_ax.yaxis.set_minor_formatter(FormatStrFormatter(""))


def draw_run(series: Series) -> bytes:
    """One run: raw and smoothed training loss, validation points, learning rate; PNG bytes."""
    return render([series], "png")


def render(all_series: list[Series], fmt: str) -> bytes:
    """One or several runs on the same axes (a legend entry per run and curve), as `fmt` bytes."""
    fig, loss_ax, lr_ax = _figure()
    single = len(all_series) == 1
    for i, series in enumerate(all_series):
        color = COLORS[i % len(COLORS)]
        label = "" if single else f"{series.name}: "
        _draw_series(loss_ax, lr_ax, series, color, VAL_COLOR if single else color, label)
    if single:
        fig.suptitle(f"run '{all_series[0].name}'", fontsize=14, fontweight="bold")
        loss_ax.set_title(_summary(all_series[0]), fontsize=10)
    else:
        fig.suptitle("runs " + ", ".join(f"'{s.name}'" for s in all_series), fontsize=14, fontweight="bold")
        loss_ax.set_title("training loss (smoothed; raw behind it) and validation loss", fontsize=10)
        if any(s.train_steps for s in all_series):
            lr_ax.legend(loc="best", fontsize=8)
    _loss_scale(loss_ax, all_series)
    loss_ax.legend(loc="best", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# `finetune plot`
# ---------------------------------------------------------------------------------------------


def _run_dir(name: str, runs_dir: str) -> Path:
    """RUN as a run's name under --runs-dir, or a run directory's path."""
    from finetune import runs

    path = Path(name)
    if path.is_dir() and ((path / metrics.FILE_NAME).exists() or (path / "config.yaml").is_file()):
        return path
    return runs.find_run(runs_dir, name)


def plot_runs(names: list[str], runs_dir: str, output: Optional[str] = None) -> Path:
    """Draw the runs on the same axes; returns the file written (default: the run's loss.png for
    one run, ./loss-compare.png for several)."""
    run_dirs = [_run_dir(name, runs_dir) for name in names]
    target = Path(output) if output else (run_dirs[0] / PLOT_NAME if len(run_dirs) == 1 else Path(COMPARE_NAME))
    if target.suffix.lower() not in FORMATS:
        raise FinetuneError(f"--output {target} must end in one of {', '.join(FORMATS)}")
    if target.is_dir():
        raise FinetuneError(f"--output {target} is a directory; name a file such as {target / COMPARE_NAME}")
    all_series = [read_series(run_dir) for run_dir in run_dirs]
    for run_dir, series in zip(run_dirs, all_series):
        if series.empty:
            raise FinetuneError(
                f"run '{run_dir.name}' has no metrics yet ({run_dir / metrics.FILE_NAME} is missing or holds no "
                f"loss); train it until its first --log-every step"
            )
    files.write_atomic(target, render(all_series, target.suffix.lower()[1:]), "plot", durable=False)
    return target


# ---------------------------------------------------------------------------------------------
# During training: a helper process
# ---------------------------------------------------------------------------------------------


def draw_into(run_dir: Path) -> bool:
    """Redraw runs/<run>/loss.png from its metrics.jsonl; False when there is nothing to draw yet."""
    series = read_series(run_dir)
    if series.empty:
        return False
    files.write_atomic(run_dir / PLOT_NAME, draw_run(series), "loss plot", durable=False)
    return True


@dataclass
class LossPlotter:
    """The training side of the helper process. Without a run directory (ranks other than 0) it does nothing."""

    run_dir: Optional[Path] = None
    warn: Callable[[str], None] = print
    process: Optional[subprocess.Popen] = None
    stopped: bool = False  # closed, or failed (warned once)

    @property
    def path(self) -> Path:
        return (self.run_dir or Path(".")) / PLOT_NAME

    def redraw(self) -> None:
        """Ask for a drawing; returns at once (the helper draws the latest metrics.jsonl when it can)."""
        if self.run_dir is None or self.stopped:
            return
        process = self.process or self._start()
        if process is None or process.poll() is not None:
            self._failed()
            return
        try:
            process.stdin.write(b"\n")
            process.stdin.flush()
        except OSError:  # the helper is gone: its own line says why
            self._failed()

    def close(self, wait: bool = True) -> bool:
        """The last drawing, waited for; True when loss.png is there. Idempotent.

        wait=False (a second Ctrl-C: the user wants out now) leaves a running helper to draw and end alone.
        """
        if self.run_dir is None or self.stopped:
            return False
        process = self.process or (self._start() if wait else None)
        self.stopped = True
        if process is None:
            return False
        try:
            process.stdin.close()
            if not wait:
                return False
            process.wait(timeout=CLOSE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        if process.returncode != 0:
            self._report(process)
            return False
        return self.path.is_file()

    def __enter__(self) -> LossPlotter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        """The last drawing at the end of training, also when it fails; a second Ctrl-C does not wait for it."""
        self.close(wait=kind is not KeyboardInterrupt)

    def _start(self) -> Optional[subprocess.Popen]:
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "finetune.loss_plot", str(self.run_dir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                # Out of the terminal's process group: Ctrl-C stops training (which then asks for the last
                # drawing), not the plot. Without training the helper still ends, at the end of its input.
                start_new_session=True,
            )
        except OSError as exc:
            self.stopped = True
            self.warn(f"warning: loss.png will not be drawn: the plotting process did not start ({exc})")
            return None
        return self.process

    def _failed(self) -> None:
        self.stopped = True
        if self.process is not None:
            self.process.wait()
            self._report(self.process)

    def _report(self, process: subprocess.Popen) -> None:
        detail = _last_line(process.stderr) or f"exit code {process.returncode}"
        self.warn(f"warning: {self.path} is no longer drawn ({detail}); training goes on")


def _last_line(stream: Optional[IO[bytes]]) -> str:
    if stream is None:
        return ""
    lines = stream.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else ""


# The helper draws at most this share of the time (a drawing takes ~0.3 s of a core; training needs them all).
DRAWING_SHARE = 0.03
MIN_GAP_S = 5.0


def serve(run_dir: Path) -> int:
    """The helper process: drawings on request from stdin, spaced so that drawing takes at most DRAWING_SHARE of
    the time (requests in between make one drawing), and a last one at the end of input."""
    import select
    import time
    import warnings

    warnings.simplefilter("ignore")  # its stderr is for the one line that says why it stopped
    try:
        os.nice(5)  # training comes first on a busy CPU
    except OSError:
        pass
    fd, drawn_at, pending, next_drawing = sys.stdin.fileno(), None, False, 0.0
    while True:
        wait = max(0.0, next_drawing - time.monotonic()) if pending else None
        if select.select([fd], [], [], wait)[0]:
            request = os.read(fd, 4096)
            if not request:  # end of input: training is over, the last drawing now
                return _draw_if_new(run_dir, drawn_at)[0]
            pending = True
            if time.monotonic() < next_drawing:
                continue
        started = time.monotonic()
        code, drawn_at = _draw_if_new(run_dir, drawn_at)
        if code:
            return code
        pending = False
        next_drawing = time.monotonic() + max(MIN_GAP_S, (time.monotonic() - started) / DRAWING_SHARE)


def _draw_if_new(run_dir: Path, drawn_at: Optional[tuple[int, int]]) -> tuple[int, Optional[tuple[int, int]]]:
    """Draw unless metrics.jsonl is as it was at the last drawing: (exit code, the file's state drawn)."""
    state = _file_state(run_dir / metrics.FILE_NAME)
    if state == drawn_at:
        return 0, drawn_at
    try:
        draw_into(run_dir)
    except Exception as exc:  # whatever the cause, training must not notice but this one line
        print(f"{type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1, drawn_at
    return 0, state


def _file_state(path: Path) -> Optional[tuple[int, int]]:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))
