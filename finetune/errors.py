"""The one exception type for problems a user can fix."""


class FinetuneError(Exception):
    """A problem caused by input the user controls (a file, a flag, a run name).

    The CLI prints its message as a single line and exits non-zero, without a traceback, so the
    message must name the cause and the fix.
    """
