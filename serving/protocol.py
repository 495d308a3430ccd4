"""Request models (pydantic) and response builders in OpenAI's wire format (Responses, Conversations, Chat
Completions), plus the error shape `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def new_id(prefix: str) -> str:
    """An unguessable id: `prefix` + 192 random bits."""
    return f"{prefix}_{secrets.token_hex(24)}"


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(kind: str, identifier: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No {kind} found with id '{identifier}'.", param=param, code="not_found")


# -- requests ---------------------------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Request):
    type: str = "input_text"
    text: str


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ConversationRef(_Request):
    id: str


class ResponseCreate(_Request):
    model: str | None = None
    input: str | list[MessageItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    metadata: dict[str, str] | None = None

    def conversation_id(self) -> str | None:
        return self.conversation.id if isinstance(self.conversation, ConversationRef) else self.conversation


class ConversationCreate(_Request):
    items: list[MessageItem] | None = None
    metadata: dict[str, str] | None = None


class ConversationUpdate(_Request):
    metadata: dict[str, str]


class ItemsCreate(_Request):
    items: list[MessageItem]


class ChatMessage(_Request):
    role: Literal["user", "assistant", "system", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionCreate(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    conversation: str | None = None  # extension: continue this conversation (only the last user message is read)
    store: bool = True
    metadata: dict[str, str] | None = None


# -- response objects -------------------------------------------------------------------------------------------------
def message_item(item_id: str, role: str, text: str, status: str = "completed") -> dict:
    part = "output_text" if role == "assistant" else "input_text"
    content = {"type": part, "text": text}
    if part == "output_text":
        content["annotations"] = []
    return {"type": "message", "id": item_id, "status": status, "role": role, "content": [content]}


def response_object(response_id: str, model: str, created_at: float, status: str, output_item: dict | None,
                    request: ResponseCreate, conversation_id: str | None, usage: dict | None,
                    max_output_tokens: int, temperature: float, top_p: float,
                    incomplete_reason: str | None = None, error: dict | None = None) -> dict:  # fmt: skip
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": request.instructions,
        "max_output_tokens": max_output_tokens,
        "model": model,
        "output": [output_item] if output_item else [],
        "parallel_tool_calls": False,
        "previous_response_id": request.previous_response_id,
        "conversation": {"id": conversation_id} if conversation_id else None,
        "reasoning": {"effort": None, "summary": None},
        "store": request.store,
        "temperature": temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
        "top_p": top_p,
        "truncation": "disabled",
        "usage": usage,
        "metadata": request.metadata or {},
    }


def response_usage(input_tokens: int, output_tokens: int) -> dict:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def conversation_object(conversation_id: str, created_at: float, metadata: dict) -> dict:
    return {"id": conversation_id, "object": "conversation", "created_at": int(created_at), "metadata": metadata}


def item_list(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}  # fmt: skip


def chat_completion(completion_id: str, model: str, created: float, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, conversation_id: str | None) -> dict:  # fmt: skip
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(created),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "conversation": conversation_id,
    }


def chat_chunk(completion_id: str, model: str, created: float, delta: dict, finish_reason: str | None,
               conversation_id: str | None, usage: dict | None = None, choices: bool = True) -> dict:  # fmt: skip
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(created),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices else [],
        "usage": usage,
        "conversation": conversation_id,
    }


def now() -> float:
    return time.time()


JSON = dict[str, Any]
