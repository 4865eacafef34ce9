"""Request bodies of the OpenAI-compatible endpoints (pydantic), and their sampling params.

Field names and ranges follow the OpenAI API; the extensions are vLLM's (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``) and Cadenza's (``session_id``, ``retention``). Unknown
fields are accepted and ignored, as OpenAI-compatible servers do, so newer SDKs keep working.
Tools, ``tool_choice`` and ``response_format`` are validated by ``server/tool_requests.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from cadenza.core.sampling_params import MAX_LOGPROBS, SamplingParams
from cadenza.server.request_body import RequestBody
from cadenza.session.ids import MAX_SESSION_ID_CHARS
from cadenza.tools.spec import arguments_object

# OpenAI's default for /v1/completions when max_tokens is absent or null (chat has none).
DEFAULT_COMPLETION_MAX_TOKENS = 16


class TextPart(RequestBody):
    type: Literal["text", "input_text", "output_text"]
    text: str


class FunctionCallBody(RequestBody):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallBody(RequestBody):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallBody


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_template_message(self) -> dict[str, Any]:
        # The template sees "system" for OpenAI's newer "developer" role.
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            # Templates (as transformers passes them) take the arguments as an object.
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": arguments_object(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
            if self.name:
                message["name"] = self.name
        return message


class StreamOptions(RequestBody):
    include_usage: bool = False


class RetentionBody(RequestBody):
    ttl_s: float = Field(0.0, ge=0, le=86400, allow_inf_nan=False)
    priority: int = Field(0, ge=-1000, le=1000)


class _SamplingFields(RequestBody):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    session_id: str | None = Field(None, min_length=1, max_length=MAX_SESSION_ID_CHARS)
    retention: RetentionBody | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=stop or None,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            max_tokens=max_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true (as in the OpenAI API)")
        return value

    def to_sampling_params(self) -> SamplingParams:
        limit = self.max_completion_tokens or self.max_tokens
        wanted = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(limit, wanted)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="one prompt: text, token ids, or a one-element list of either"
    )
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def to_sampling_params(self) -> SamplingParams:
        # null means the default, as absent does: never an unbounded completion.
        limit = DEFAULT_COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        return self.sampling_params(limit, self.logprobs)


class HintRequest(RequestBody):
    expected_arrival_s: float | None = Field(None, ge=0, le=86400, allow_inf_nan=False)
    ttl_s: float | None = Field(None, ge=0, le=86400, allow_inf_nan=False)
    priority: int = Field(0, ge=-1000, le=1000)
