"""Request bodies of the OpenAI-compatible routes (pydantic; a bad field is a 400 naming it).
Unknown fields are ignored, as OpenAI's own server does."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Beyond OpenAI (vLLM's extras)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # Output constraints: OpenAI's response_format, and the extras of SGLang / vLLM.
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint_values(self) -> dict[str, Any]:
        """The output constraint as SamplingParams fields (several given: SamplingParams
        refuses them, naming each)."""
        values: dict[str, Any] = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            values["json_object"] = True
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ValueError("response_format json_schema needs json_schema.schema")
            values["json_schema"] = fmt.json_schema.schema_
        pairs = (
            ("regex", self.regex or self.guided_regex),
            ("ebnf", self.ebnf or self.guided_grammar),
            ("json_schema", self.guided_json),
            ("choice", self.guided_choice),
        )
        for name, value in pairs:
            if value is not None:
                if name in values:
                    raise ValueError(f"{name} is given twice (response_format and guided_*)")
                values[name] = value
        return values

    def sampling_values(self) -> dict[str, Any]:
        keys = [
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "stop",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "top_k",
            "min_p",
            "repetition_penalty",
            "ignore_eos",
            "min_tokens",
            "stop_token_ids",
            "skip_special_tokens",
            "include_stop_str_in_output",
        ]
        return {k: getattr(self, k) for k in keys} | self.constraint_values()


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    max_tokens: int | None = 16
    best_of: int | None = None  # only as n (vLLM V1): no server-side ranking of samples


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any]  # OpenAI's is JSON text; an object is taken too


class MessageToolCall(BaseModel):
    """A call in an earlier assistant message."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer
    reasoning_content: str | None = None  # assistant messages of reasoning models


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of an object; None: no arguments
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}; checked
    # by chat_tools.plan_tools, whose errors name the value and the choices.
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Beyond OpenAI (vLLM's and SGLang's): extra variables for the chat template, e.g.
    # {"enable_thinking": false}.
    chat_template_kwargs: dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the last N tokens of long inputs
    user: str | None = None
