"""Pydantic models of the wire API: our compaction endpoints and the OpenAI Chat Completions subset we serve.

Where OpenAI defines a shape (chat requests and responses, usage, models, errors) these mirror it field for field,
so the official `openai` client parses our answers unchanged; the compaction objects follow OpenAI's conventions
(`object`, `created_at`, `encrypted_content`, `metadata` limits). A compacted context enters a chat either as a
``{"type": "compaction", "encrypted_content": ...}`` content part of the first message or as the top-level
``compaction`` field (what the client's ``extra_body`` sends).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]
CompactionMethod = Literal[
    "am", "am-omp", "am-omp-fast", "am-no-beta", "am-no-values", "truncate", "h2o", "snapkv", "kvzip"
]
QuerySource = Literal["repeat", "self-study", "context"]
CompactionStatus = Literal["queued", "in_progress", "completed", "failed"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]

DEFAULT_KEEP_RATIO = 0.1
DEFAULT_TTL_SECONDS = 24 * 3600
MAX_TTL_SECONDS = 30 * 24 * 3600
# beta_prior beyond this already pins beta at 0 (plain eviction); the bound keeps a hostile value from overflowing the
# mass fit's ridge to inf.
MAX_BETA_PRIOR = 1e4
MAX_STOP_SEQUENCES = 4
# Each hint is answered from the full cache before the compaction (up to 64 tokens each): the bounds keep that cost
# a small share of the compaction's, and still admit every question of the longest QuALITY document (19) as hints.
MAX_HINTS = 32
MAX_HINT_CHARS = 4000
# Key importances lie in [0, 1]: from a weight of 1e4 on, the hints order the keys as any larger weight would.
MAX_HINT_WEIGHT = 1e4
# OpenAI's limits on `metadata`.
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


# --- errors -------------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (for the OpenAPI spec; app.errors builds it)."""

    error: ErrorDetail


# --- messages -----------------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class CompactionPart(BaseModel):
    """A reference to a compacted context, as OpenAI's compaction item: `encrypted_content` is the opaque token."""

    type: Literal["compaction"]
    encrypted_content: str = Field(min_length=1)
    id: str | None = None


ContentPart = Annotated[TextPart | CompactionPart, Field(discriminator="type")]


class InputMessage(BaseModel):
    """A chat message of a context to compact (text only); other OpenAI message fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str | list[TextPart]
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text, parts concatenated."""
        return _joined_text(self.content)


class ChatMessage(InputMessage):
    """A chat completion message; the first one may carry a compaction part. Assistant content may be null."""

    content: str | list[ContentPart] | None = None

    def compaction_tokens(self) -> list[str]:
        """The `encrypted_content` of each compaction part in this message."""
        if not isinstance(self.content, list):
            return []
        return [part.encrypted_content for part in self.content if isinstance(part, CompactionPart)]


def _joined_text(content: str | list | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content if isinstance(part, TextPart))


# --- compaction ---------------------------------------------------------------------------------------------------


class CompactRequest(BaseModel):
    """POST /v1/compact. Unknown fields are refused so a misspelt option is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputMessage], Field(min_length=1)]
    keep_ratio: float | None = Field(default=None, gt=0, le=1)
    target_tokens: int | None = Field(default=None, ge=1)
    method: CompactionMethod = "am"
    query_sources: list[QuerySource] = Field(default_factory=lambda: ["repeat"], min_length=1)
    chunk_tokens: int | None = Field(default=None, ge=1)
    # Pull of beta towards 0 in the mass fit (CompactionConfig.beta_prior): 0 fits beta on the reference queries alone
    # (best for exact retrieval: needles, key-value lookups); about 10 suits narrative questions, where beta fitted on
    # repeat-pass queries costs answer log-likelihood (docs/quality.md, session 8).
    beta_prior: float = Field(default=0.0, ge=0, le=MAX_BETA_PRIOR)
    # Questions or tasks the caller expects to ask of the compacted context (CompactionConfig.hints): the keys that
    # answering them attends to are kept first. Optional; without them the compaction is question-agnostic.
    hints: list[Annotated[str, Field(min_length=1, max_length=MAX_HINT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_HINTS)
    # How far the hints' keys outrank the repeat pass's (CompactionConfig.hint_weight; None: the core's default, 10).
    # Higher trusts the hints more: 1000 kept more needle answers at 20x, and lost the key-value answers at 5x-10x.
    hint_weight: float | None = Field(default=None, ge=1, le=MAX_HINT_WEIGHT)
    ttl_seconds: int = Field(default=DEFAULT_TTL_SECONDS, ge=1, le=MAX_TTL_SECONDS)
    background: bool = False
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_budget(self) -> CompactRequest:
        """keep_ratio and target_tokens are two ways to say the same thing: at most one, keep_ratio 0.1 if none."""
        if self.keep_ratio is not None and self.target_tokens is not None:
            raise ValueError("give either keep_ratio or target_tokens, not both")
        if self.keep_ratio is None and self.target_tokens is None:
            self.keep_ratio = DEFAULT_KEEP_RATIO
        return self

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        return _check_metadata(metadata)


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's metadata limits: 16 pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} metadata pairs are allowed")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise ValueError(f"metadata key {key[:16]!r}... is longer than {MAX_METADATA_KEY_CHARS} characters")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"metadata value of {key!r} is longer than {MAX_METADATA_VALUE_CHARS} characters")
    return metadata


class CompactionUsage(BaseModel):
    input_tokens: int
    retained_slots: int
    compaction_ratio: float
    blob_bytes: int
    phase_seconds: dict[str, float] = Field(default_factory=dict)


class CompactionObject(BaseModel):
    """A compaction job and, once completed, the token to use its result."""

    id: str
    object: Literal["compaction"] = "compaction"
    model: str
    created_at: int
    status: CompactionStatus
    encrypted_content: str | None = None
    expires_at: int | None = None
    usage: CompactionUsage | None = None
    error: ErrorDetail | None = None
    metadata: dict[str, str] | None = None


class CompactionDeleted(BaseModel):
    """DELETE /v1/compactions/{id}, shaped like OpenAI's deletion answers."""

    id: str
    object: Literal["compaction.deleted"] = "compaction.deleted"
    deleted: bool


# --- chat completions request -------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class CompactionRef(BaseModel):
    """The top-level `compaction` extra field."""

    encrypted_content: str = Field(min_length=1)


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. OpenAI fields we do not use (user, presence_penalty, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    compaction: CompactionRef | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported")
        return n

    @model_validator(mode="after")
    def _one_compaction_in_front(self) -> ChatCompletionRequest:
        """A compacted context is the prefix of the conversation, so there is at most one and it comes first."""
        if any(message.compaction_tokens() for message in self.messages[1:]):
            raise ValueError("a compaction part may only appear in the first message")
        if len(self.messages[0].compaction_tokens()) + (self.compaction is not None) > 1:
            raise ValueError("give one compaction: a content part of the first message or the top-level field")
        return self

    def compaction_token(self) -> str | None:
        """The `encrypted_content` of the compacted context this chat continues, if any."""
        if self.compaction is not None:
            return self.compaction.encrypted_content
        tokens = self.messages[0].compaction_tokens()
        return tokens[0] if tokens else None

    def max_new_tokens(self, default: int) -> int:
        """max_completion_tokens, else the deprecated max_tokens, else the server default."""
        return self.max_completion_tokens or self.max_tokens or default

    def stop_sequences(self) -> list[str]:
        """`stop` as a list of non-empty strings."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


# --- chat completions response ------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    """cached_tokens counts the compacted prefix served from a handle (tokens it stands for, not slots)."""

    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE `data:` event; all chunks of a stream share id and created. The usage chunk has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --- models -------------------------------------------------------------------------------------------------------


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
