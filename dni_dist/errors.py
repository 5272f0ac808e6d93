"""User-facing errors: one line, naming the bad value and the fix."""


class ConfigError(ValueError):
    """Bad input from a user (config, CLI flag, data path).

    The CLI prints the message alone (no traceback) and exits with code 2, so the
    message must say which value was wrong and what would be accepted instead.
    """
