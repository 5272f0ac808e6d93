"""User-facing errors: one line, naming the bad value and the fix."""


class ConfigError(ValueError):
    """Bad input from a user (config, CLI flag, data path).

    The CLI prints the message alone (no traceback) and exits with code 2, so the
    message must say which value was wrong and what would be accepted instead.
    """


class RunFailed(RuntimeError):
    """A run that cannot go on (numeric blow-up, restarts exhausted). The message says
    why and where the last checkpoint is; the CLI prints it as one line, exit code 1."""


class StageLost(RuntimeError):
    """A stage actor died or its links failed; the driver may restart from a checkpoint."""
