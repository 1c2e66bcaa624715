"""What the API takes and how it refuses: OpenAI's request shapes (unknown fields are accepted
and ignored, as OpenAI's server does), the feedback request, and the error every refusal is."""

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


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False


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
    """A refused request: its HTTP status and OpenAI-style error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
