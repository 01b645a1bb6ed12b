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


class MissingDependencyError(QuasarError):
    """An optional dependency (an extra) is not installed: one line naming the extra to install."""


def require(module: str, extra: str, purpose: str):
    """import `module`, or raise MissingDependencyError naming the extra that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {module!r}, which is not installed ({e}); "
            f"install the extra: pip install -e '.[{extra}]'") from None
