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


class SnapshotLost(RuntimeError):
    """The in-memory snapshot a restart needs is gone (its node died with the object store
    holding it); the driver falls back to the last checkpoint on disk, if there is one."""


def reason(exc: BaseException) -> str:
    """The last line of an error's text without its class prefix: a remote error (Ray's
    RayTaskError) carries the whole remote traceback in its text."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return exc.__class__.__name__
    last = lines[-1]
    prefix, sep, rest = last.partition(": ")
    return rest if sep and "." in prefix and " " not in prefix else last
