"""The error every config mistake becomes: its message names the key and the allowed values."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


class MissingDependencyError(ImportError):
    """An optional package (a pip extra) that the requested feature needs is not installed; the
    message names the package and the install command."""


class ExportCheckError(RuntimeError):
    """An exported model whose runtime results differ from the PyTorch model's (the message
    says how much and where the files are)."""
