"""Render what the user compacts (a document, chat messages, tool outputs) with the model's own chat template.

Only message *content* is compactable; the template's wrapper tokens (role tags, system prompt, separators) stay
verbatim with beta = 0, as the paper keeps them. Each content string is swapped for a sentinel before rendering, so
the rendered text can be split exactly into wrapper and content pieces whatever the template does around them; the
pieces are tokenized separately, and the same split is used at ingestion and when a chat continues the context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from transformers import PreTrainedTokenizerBase

ALLOWED_ROLES = ("system", "developer", "user", "assistant", "tool")
_SENTINEL = "\ue000kvc{index}\ue001"
_SENTINEL_PATTERN = re.compile("\ue000kvc(\\d+)\ue001")
REPEAT_PROMPT = "Repeat the previous context verbatim."


class ContextError(ValueError):
    """The input cannot be compacted as given (empty, malformed messages, a template that drops content)."""


@dataclass
class RenderedContext:
    ids: list[int]
    compactable: list[bool]  # per token: True for message-content tokens, False for template wrapper tokens
    roles: list[str]

    @property
    def compactable_count(self) -> int:
        return sum(self.compactable)

    def span(self) -> torch.Tensor:
        """Positions of the compactable tokens, in order."""
        return torch.tensor([i for i, c in enumerate(self.compactable) if c], dtype=torch.long)

    def compactable_ids(self) -> list[int]:
        """The compactable tokens themselves (the document's own tokens, without the template's)."""
        return [token for token, compactable in zip(self.ids, self.compactable) if compactable]


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                raise ContextError(f"{where}: only text content parts can be compacted")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ContextError(f"{where}: content must be a string or a list of text parts")


def normalize_messages(context: str | list[dict]) -> list[dict]:
    """A string is one user message; messages keep only role and text content."""
    if isinstance(context, str):
        context = [{"role": "user", "content": context}]
    if not isinstance(context, list) or not context:
        raise ContextError("input must be a non-empty string or a non-empty list of messages")
    messages = []
    for index, message in enumerate(context):
        if not isinstance(message, dict) or message.get("role") not in ALLOWED_ROLES:
            raise ContextError(f"input[{index}]: each message needs a role among {', '.join(ALLOWED_ROLES)}")
        messages.append({"role": message["role"], "content": _content_text(message.get("content"), f"input[{index}]")})
    if not any(m["content"].strip() for m in messages):
        raise ContextError("input is empty: there is no text to compact")
    return messages


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        # Base models without a chat template: plain concatenation, so raw documents still work.
        return "".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _placeholders(roles: list[str]) -> list[dict]:
    return [{"role": role, "content": _SENTINEL.format(index=index)} for index, role in enumerate(roles)]


def render_context(tokenizer: PreTrainedTokenizerBase, context: str | list[dict]) -> RenderedContext:
    messages = normalize_messages(context)
    roles = [m["role"] for m in messages]
    text = _render(tokenizer, _placeholders(roles), add_generation_prompt=False)
    ids: list[int] = []
    compactable: list[bool] = []
    cursor, seen = 0, []
    for match in _SENTINEL_PATTERN.finditer(text):
        wrapper = _encode(tokenizer, text[cursor:match.start()])
        content = _encode(tokenizer, messages[int(match.group(1))]["content"])
        ids += wrapper + content
        compactable += [False] * len(wrapper) + [True] * len(content)
        cursor = match.end()
        seen.append(int(match.group(1)))
    if sorted(seen) != list(range(len(roles))):
        raise ContextError("the model's chat template drops or repeats message content; it cannot be compacted")
    tail = _encode(tokenizer, text[cursor:])
    ids += tail
    compactable += [False] * len(tail)
    return RenderedContext(ids=ids, compactable=compactable, roles=roles)


def continuation_ids(tokenizer: PreTrainedTokenizerBase, roles: list[str], new_messages: list[dict],
                     add_generation_prompt: bool = True) -> list[int]:
    """Token ids that follow a compacted context of messages with `roles` when the chat goes on with `new_messages`."""
    new_messages = [{"role": m["role"], "content": _content_text(m.get("content"), "messages")} for m in new_messages]
    placeholders = _placeholders(roles)
    prefix = _render(tokenizer, placeholders, add_generation_prompt=False)
    full = _render(tokenizer, placeholders + new_messages, add_generation_prompt=add_generation_prompt)
    if not full.startswith(prefix):
        raise ContextError("the chat template renders the compacted messages differently when followed by new ones")
    return _encode(tokenizer, full[len(prefix):])
