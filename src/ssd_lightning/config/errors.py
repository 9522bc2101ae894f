"""The error every config mistake becomes: its message names the key and the allowed values."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""
