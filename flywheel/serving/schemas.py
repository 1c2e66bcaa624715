"""What the API takes and how it refuses: OpenAI's request shapes, the feedback request, and the
error every refusal is.

Fields OpenAI defines that this server cannot honour (tools, JSON mode, logit bias, penalties; logprobs
on the built-in engine) are refused with a 400 naming the field when they ask for something:
ignoring them answered a tool call or a JSON request with plain text. Other unknown fields are
ignored, as OpenAI's server does."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _unicode_text(text: str) -> str:
    """JSON may carry what no tokenizer (or database) takes: a lone surrogate such as \\ud800.
    Such a request is refused alone, before it can fail the batch it would join."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"is not valid Unicode text: a lone surrogate (\\u{ord(text[error.start]):04x}) at character {error.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_unicode_text)]

MAX_CHOICES = 16  # n: OpenAI takes up to 128; more than this is a batch job, not a request
MAX_LOGPROBS = 20  # top_logprobs: OpenAI's limit
StopSequence = Annotated[Text, Field(min_length=1, max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # passed to the engine; OpenAI's end-user id
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=4)] | None = None  # OpenAI: up to 4
    logprobs: bool | Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # chat: bool; completions: top count
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # chat only
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Asked for, these change what an answer is; at their defaults they ask for nothing.
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    logit_bias: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def unsupported(self) -> str | None:
        """The first field that asks for what this server cannot do, or None."""
        asked = {
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none", "auto"),
            "response_format": (self.response_format or {"type": "text"}).get("type") != "text",
            "logit_bias": bool(self.logit_bias),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
        }
        return next((name for name, is_asked in asked.items() if is_asked), None)

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: Annotated[str, Field(min_length=1), AfterValidator(_unicode_text)]  # a token to continue from


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: Annotated[Text, Field(max_length=100)]
    rating: Literal["up", "down"] | None = None
    preferred_response: Text | None = None
    alternative: Text | None = None
    preferred: Literal["response", "alternative"] | None = None


class ApiError(Exception):
    """A refused request: its HTTP status, OpenAI's error type and, where OpenAI has one, its
    error code ("model_not_found") and the request field it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
