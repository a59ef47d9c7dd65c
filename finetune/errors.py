"""The one exception type for problems a user can fix, and how to name a missing optional extra."""

from pathlib import Path

DISTRIBUTION = "finetune-lm"  # the name on the package index ("finetune" there is an unrelated project)


class FinetuneError(Exception):
    """A problem caused by input the user controls (a file, a flag, a run name).

    The CLI prints its message as a single line and exits non-zero, without a traceback, so the
    message must name the cause and the fix.
    """


def install_hint(extra: str) -> str:
    """The pip command that installs an optional extra, for a source checkout or an installed package."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "finetune" / "cli.py").is_file():
        return f"pip install -e '{checkout}[{extra}]'"
    return f"pip install '{DISTRIBUTION}[{extra}]'"
