"""Quasar: speculative decoding with quantized verification.

    from quasar import LLM
    from quasar.config import DeployConfig
    llm = LLM(DeployConfig(model="smollm2-135m-instruct", drafter={"method": "ngram"}))
    print(llm.generate("Name three colors.").text)
"""
from .errors import QuasarError, ConfigError, CheckpointError, UnsupportedError  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import quasar` stays cheap and never imports a backend
    if name == "LLM":
        from .engine import LLM
        return LLM
    raise AttributeError(name)
