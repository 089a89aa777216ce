"""What a run does when something goes wrong during training: it ends with one line and its own exit status,
and leaves nothing half-written where a resumed run or a user would load it.

    exit 0          trained to the end
    exit 1          RunError: training failed (a write failed); one `error:` line
    exit 2          UsageError: bad input, before training (params.py)
"""


class RunError(Exception):
    """A failure during the run, not a mistake in the input: one `error:` line, exit status 1."""


# ---------------------------------------------------------------- write failures
def is_write_error(e):
    """An error from the file system (full disk, no permission, read-only): OSError, or the safetensors
    writer's own error type, which carries the OS error in its message."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
