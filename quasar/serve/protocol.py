"""Request and response bodies of the OpenAI-compatible API (pydantic).

Request models forbid unknown fields, so a misspelt parameter is a 400 naming it rather than a
silently ignored knob. OpenAI parameters Quasar does not implement are accepted only at their
neutral value (`n: 1`, `logprobs: null`, penalties 0, ...); any other value is a 400 that names
the parameter. Extensions (as in vLLM): `top_k`, `ignore_eos`, `return_token_ids`.

Unset sampling parameters take the deployment's `sampling:` section (not OpenAI's defaults of
temperature 1 and 16 tokens): the YAML deployment is the service's policy.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None        # usage is sent in the final chunk either way
    continuous_usage_stats: Optional[bool] = None


class _Sampling(_Strict):
    """Parameters shared by the two endpoints."""
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)               # extension; -1 or 0 = off
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    stop: Optional[Union[str, list[str]]] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False                                # extension (benchmarks)
    return_token_ids: bool = False                          # extension: token ids in the response
    user: Optional[str] = None
    # OpenAI parameters accepted only at their neutral value:
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    best_of: Optional[int] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(field, message) for a parameter set to a value Quasar does not implement."""
        if self.n != 1:
            return "n", f"n={self.n} is not supported (one choice per request); send n separate requests"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported (speculative verification compares the model's own tokens)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self):
        for name, bad in (("echo", self.echo), ("logprobs", self.logprobs is not None),
                          ("suffix", self.suffix is not None)):
            if bad:
                return name, f"{name} is not supported"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")        # name, tool_call_id, ... are passed to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[Any] = None

    def unsupported(self):
        for name, bad in (("logprobs", bool(self.logprobs)), ("top_logprobs", self.top_logprobs is not None),
                          ("tools", bool(self.tools)), ("tool_choice", self.tool_choice not in (None, "none")),
                          ("response_format", self.response_format not in (None, {"type": "text"}))):
            if bad:
                return name, f"{name} is not supported"
        return super().unsupported()


# ---------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "max_seq_len": "length",
                  "abort": "abort", "error": "error"}


def finish_reason(engine_reason: str) -> str:
    """The engine's finish reason in OpenAI's words."""
    return FINISH_REASONS.get(engine_reason, engine_reason)


class _Choice(BaseModel):
    index: int = 0
    finish_reason: Optional[str] = None
    logprobs: None = None
    token_ids: Optional[list[int]] = None           # with return_token_ids


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=now)
    model: str
    usage: Optional[Usage] = None
    prompt_token_ids: Optional[list[int]] = None    # with return_token_ids


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Response):                 # also each streamed chunk, as in OpenAI's API
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(_Choice):
    delta: Delta


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "quasar"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
