"""User-facing errors. Each one names the problem and the fix; the CLIs print them without a
traceback and exit non-zero."""


class QuasarError(Exception):
    """Base class: anything the user can fix (config, paths, unsupported combinations)."""


class ConfigError(QuasarError):
    pass


class CheckpointError(QuasarError):
    pass


class UnsupportedError(QuasarError):
    """A backend, scheme or model feature that is not available in this combination."""


class ContextLengthError(QuasarError):
    pass
