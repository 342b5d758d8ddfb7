"""The one exception type that means "the user's input is bad".

The CLI turns it into a single `error: ...` line and exit code 2; anything
else escaping is a bug in swtool and keeps its traceback.
"""


class SwtoolError(Exception):
    """Bad input: a file, a config or an option swtool cannot use."""


class CheckpointError(SwtoolError):
    """A checkpoint file is missing, truncated or inconsistent."""

    def __init__(self, path, message):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
