"""Tokenizer of the Reactive Transformer (RxT).

RxT processes one interaction at a time: the decoder sees `[BOS][Q]{query}[A]` and generates `{answer}[EOS]`, and the
memory encoder sees the full interaction `[BOS][Q]{query}[A]{answer}[EOS]`. This module provides the special tokens,
a chat template that renders conversations as such interactions, a byte-level BPE trainer wrapped in a
[`PreTrainedTokenizerFast`], and a check that an existing tokenizer carries the tokens RxT needs.

This file is self-contained (it only imports `tokenizers` and `transformers`) so it can be copied flat.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "RXT_SPECIAL_TOKENS",
    "RXT_CHAT_TEMPLATE",
    "RXT_TEMPLATES",
    "RXT_TOKEN_ID_FIELDS",
    "RXT_DEFAULT_TOKEN_IDS",
    "RXT_THINKING_MODES",
    "CONTROL_TOKEN_POLICIES",
    "check_rxt_tokenizer",
    "check_user_text",
    "find_control_tokens",
    "system_segments",
    "tokenize_segments",
    "turn_prompt_segments",
    "render_interaction",
    "render_query",
    "render_system",
    "render_turn_prompt",
    "train_rxt_tokenizer",
]

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
MASK_TOKEN = "[MASK]"
QUERY_TOKEN = "[Q]"
ANSWER_TOKEN = "[A]"
THINK_TOKEN = "[T]"
TOOL_CALL_TOKEN = "[C]"
TOOL_USE_TOKEN = "[U]"
INTERNAL_TOKEN = "[I]"

# Order fixes the ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, [MASK]=4, [Q]=5, [A]=6, [T]=7, [C]=8, [U]=9, [I]=10.
RXT_SPECIAL_TOKENS = [
    PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN,
    QUERY_TOKEN, ANSWER_TOKEN, THINK_TOKEN, TOOL_CALL_TOKEN, TOOL_USE_TOKEN, INTERNAL_TOKEN,
]  # fmt: skip

# Special tokens without a named attribute on `PreTrainedTokenizerBase`.
RXT_EXTRA_SPECIAL_TOKENS = RXT_SPECIAL_TOKENS[5:]

# `check_rxt_tokenizer` output key -> token; the first 7 are required, the last 4 optional.
_REQUIRED_TOKEN_IDS = {
    "pad_token_id": PAD_TOKEN,
    "unk_token_id": UNK_TOKEN,
    "bos_token_id": BOS_TOKEN,
    "eos_token_id": EOS_TOKEN,
    "mask_token_id": MASK_TOKEN,
    "query_token_id": QUERY_TOKEN,
    "answer_token_id": ANSWER_TOKEN,
}
_OPTIONAL_TOKEN_IDS = {
    "think_token_id": THINK_TOKEN,
    "tool_call_token_id": TOOL_CALL_TOKEN,
    "tool_use_token_id": TOOL_USE_TOKEN,
    "internal_token_id": INTERNAL_TOKEN,
}
# Config field -> token, in id order: the one table of the RxT special tokens' config fields (the converter, trainers,
# scripts and tests read it from here).
RXT_TOKEN_ID_FIELDS = {**_REQUIRED_TOKEN_IDS, **_OPTIONAL_TOKEN_IDS}
# Config field -> id in a tokenizer built by `train_rxt_tokenizer` (the configs' defaults).
RXT_DEFAULT_TOKEN_IDS = {field: RXT_SPECIAL_TOKENS.index(token) for field, token in RXT_TOKEN_ID_FIELDS.items()}

# What happens to RxT control tokens (`RXT_SPECIAL_TOKENS`) inside user text (queries, tool results, internal
# instructions, system prompts, chat-template message content): `refuse` (the default) raises a ValueError naming the
# token and where it is; `escape` (chat session only) tokenizes user text as plain text, so `"[Q]"` typed by a user
# becomes the byte-level tokens of the characters `[`, `Q`, `]` and decodes back to the same text; `allow` (chat
# template only) inserts content verbatim, control tokens included (for text that is already rendered).
CONTROL_TOKEN_POLICIES = ("refuse", "escape")
_CONTROL_TOKEN_PATTERN = re.compile("|".join(re.escape(token) for token in RXT_SPECIAL_TOKENS))

# Byte-level BPE needs all 256 byte symbols besides the special tokens.
MIN_VOCAB_SIZE = len(RXT_SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
# Matches the default `seq_len` of the RxT decoder / encoder (one interaction).
DEFAULT_MODEL_MAX_LENGTH = 1024

# Renders a conversation as RxT interactions:
#   user + assistant          -> [BOS][Q]{user}[A]{assistant}[EOS]
#   final user (+ gen prompt) -> [BOS][Q]{user}[A]     (without `add_generation_prompt`: [BOS][Q]{user})
#   system                    -> [BOS][Q]{system}[A][EOS]; with the template variables `system_template` (and
#                                `system_prompt_title`), e.g. apply_chat_template(..., system_template=
#                                config.system_template, system_prompt_title=config.system_prompt_title), that
#                                template instead (`{title}` and `{system}` replaced, as `render_system` does)
#   user not followed by an assistant reply -> [BOS][Q]{user}[A][EOS]   (empty answer)
#   assistant without a preceding user      -> [BOS][Q][A]{assistant}[EOS]  (empty query)
# Content is inserted as is; a list of `{"type": "text", "text": ...}` parts is concatenated. Content that contains an
# RxT control token raises (see `CONTROL_TOKEN_POLICIES`) unless the template variable `control_tokens="allow"` is
# given (apply_chat_template(..., control_tokens="allow") for already rendered text). The answer and its
# [EOS] are wrapped in a `generation` block, so `return_assistant_tokens_mask=True` marks the generated tokens.
RXT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is not defined -%}{%- set content = '' -%}"
    "{%- elif message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{%- if control_tokens is not defined or control_tokens != 'allow' -%}"
    "{%- set message_index = loop.index0 -%}"
    "{%- for token in " + repr(list(RXT_SPECIAL_TOKENS)) + " -%}{%- if token in content -%}"
    "{{- raise_exception('RxT chat template: message ' + message_index | string + ' (' + message['role'] + ') "
    "contains the control token ' + token + '; expected plain text (pass control_tokens=\"allow\" to "
    "apply_chat_template to insert already rendered text as is)') -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if system_template is defined and system_template -%}"
    "{{- system_template | replace('{title}', system_prompt_title if system_prompt_title is defined "
    "else 'SYSTEM INSTRUCTIONS') | replace('{system}', content) -}}"
    "{%- else -%}{{- '[BOS][Q]' + content + '[A][EOS]' -}}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[BOS][Q]' + content -}}"
    "{%- if loop.last -%}"
    "{%- if add_generation_prompt -%}{{- '[A]' -}}{%- endif -%}"
    "{%- elif loop.nextitem['role'] != 'assistant' -%}"
    "{{- '[A][EOS]' -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'user' -%}{{- '[BOS][Q]' -}}{%- endif -%}"
    "{{- '[A]' -}}"
    "{%- generation -%}{{- content + '[EOS]' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('RxT chat template: unsupported role ' + message['role'] "
    "+ \"; expected 'user', 'assistant' or 'system'\") -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# Turn and system templates as data (docs/spec.md#templates; format placeholders in braces, tokenized without automatic
# special tokens). `{internal}` of a turn prompt is the rendered `internal` part, or "" when there is none. Alpha
# prompts end with `[A]`; Beta turn prompts end with the query / tool result and the first section token is generated
# (forced or chosen by the thinking mode, `RXT_THINKING_MODES`).
RXT_TEMPLATES = {
    "query": "[BOS]{internal}[Q]{query}",
    "tool_result": "[BOS]{internal}[U]{result}",
    "internal": "[I]{internal}",
    "alpha_answer_prompt": "[A]",
    "interaction": "[BOS][Q]{query}[A]{answer}[EOS]",
    # system prompt / memory-initialisation text (`RxTConfig.system_template`; `{title}` = `system_prompt_title`)
    "system_alpha": "[BOS][Q]{system}[A][EOS]",
    "system_beta": "[BOS][I]{title}\n\n{system}[EOS]",
    "system_reference_sft": "[BOS][Q]SYSTEM INSTRUCTIONS[A]{system}[EOS]",
}

# Thinking mode -> the section tokens allowed as the first generated token (one: forced; two: the larger logit).
RXT_THINKING_MODES = {"fast": (ANSWER_TOKEN,), "extended": (THINK_TOKEN,), "auto": (ANSWER_TOKEN, THINK_TOKEN)}


def find_control_tokens(text: str) -> list[tuple[int, str]]:
    """`(character index, token)` of every RxT control token (`RXT_SPECIAL_TOKENS`) in `text`."""
    return [(match.start(), match.group()) for match in _CONTROL_TOKEN_PATTERN.finditer(text)]


def check_user_text(text: str, what: str, control_tokens: str = "refuse") -> None:
    """Raise a ValueError if `text` (user text, called `what` in the message) contains an RxT control token and
    `control_tokens` is `'refuse'`; `'escape'` accepts it (`tokenize_segments` then tokenizes it as plain text)."""
    if control_tokens not in CONTROL_TOKEN_POLICIES:
        raise ValueError(f"control_tokens={control_tokens!r}: expected one of {list(CONTROL_TOKEN_POLICIES)}.")
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}.")
    found = find_control_tokens(text) if control_tokens == "refuse" else []
    if found:
        index, token = found[0]
        raise ValueError(
            f"{what} contains the RxT control token {token} at character {index}; expected plain text "
            "(control_tokens='refuse'). Pass control_tokens='escape' to tokenize it as plain text."
        )


def _template_segments(template: str, fields: dict) -> list[tuple[str, bool]]:
    """`template` (str.format placeholders) → `(text, is_user_text)` segments; a field value is user text (str) or
    already a list of segments."""
    segments = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            segments.append((literal, False))
        if field is not None:
            value = fields[field]
            segments.extend(value if isinstance(value, list) else [(value, True)])
    return segments


def turn_prompt_segments(text: str, kind: str = "query", internal: str | None = None) -> list[tuple[str, bool]]:
    """`render_turn_prompt` as `(text, is_user_text)` segments (the template's control tokens are not user text)."""
    if kind not in ("query", "tool_result"):
        raise ValueError(f"kind={kind!r}: expected 'query' or 'tool_result'.")
    rendered_internal = [] if internal is None else _template_segments(RXT_TEMPLATES["internal"], {"internal": internal})
    field = "query" if kind == "query" else "result"
    return _template_segments(RXT_TEMPLATES[kind], {"internal": rendered_internal, field: text})


def system_segments(
    system: str, template: str = RXT_TEMPLATES["system_alpha"], title: str = "SYSTEM INSTRUCTIONS"
) -> list[tuple[str, bool]]:
    """`render_system` as `(text, is_user_text)` segments: the template and title are configuration, `system` is
    user text."""
    parts = template.replace("{title}", title).split("{system}")
    segments = [(parts[0], False)]
    for part in parts[1:]:
        segments += [(system, True), (part, False)]
    return [(text, user) for text, user in segments if text]


def render_system(system: str, template: str = RXT_TEMPLATES["system_alpha"], title: str = "SYSTEM INSTRUCTIONS") -> str:
    """Render a system prompt / memory-initialisation text with `template` (`{title}` then `{system}` replaced)."""
    return "".join(text for text, _ in system_segments(system, template, title))


def render_turn_prompt(text: str, kind: str = "query", internal: str | None = None) -> str:
    """Beta turn prompt: `[BOS]([I]{internal})?[Q]{query}` (`kind='query'`) or `[BOS]([I]{internal})?[U]{result}`
    (`kind='tool_result'`), without a section token after it."""
    return "".join(text for text, _ in turn_prompt_segments(text, kind, internal))


def tokenize_segments(tokenizer, rows: list[list[tuple[str, bool]]], control_tokens: str = "refuse") -> list[list[int]]:
    """Token ids (no automatic special tokens) of rendered rows given as `(text, is_user_text)` segments.

    `refuse`: user text with a control token raises (`check_user_text`), each row is tokenized as one string.
    `escape`: control tokens of the template become control ids; every other run of text (user text and the
    template's plain text between control tokens) is tokenized with `split_special_tokens=True`, so control tokens
    inside user text stay plain text. A tokenizer splits its input at special tokens before anything else, so for
    text without control tokens both give the same ids."""
    for row in rows:
        for text, user in row:
            if user:
                check_user_text(text, "user text", control_tokens)
    if control_tokens == "refuse":
        return tokenizer(["".join(text for text, _ in row) for row in rows], add_special_tokens=False)["input_ids"]
    pieces = []  # per row: control-token strings and plain-text runs, in order
    for row in rows:
        row_pieces, run = [], ""
        for text, user in row:
            parts = [text] if user else _CONTROL_TOKEN_PATTERN.split(text)
            tokens = [] if user else _CONTROL_TOKEN_PATTERN.findall(text)
            for k, part in enumerate(parts):
                run += part
                if k < len(tokens):
                    if run:
                        row_pieces.append((run, False))
                    row_pieces.append((tokens[k], True))
                    run = ""
        if run:
            row_pieces.append((run, False))
        pieces.append(row_pieces)
    runs = [text for row in pieces for text, control in row if not control]
    run_ids = iter(tokenizer(runs, add_special_tokens=False, split_special_tokens=True)["input_ids"] if runs else [])
    return [
        [i for text, control in row for i in ([tokenizer.convert_tokens_to_ids(text)] if control else next(run_ids))]
        for row in pieces
    ]


def render_query(query: str) -> str:
    """Render a query as the decoder prompt `[BOS][Q]{query}[A]` (what the chat template renders with
    `add_generation_prompt=True` after a final user message)."""
    return f"{BOS_TOKEN}{QUERY_TOKEN}{query}{ANSWER_TOKEN}"


def render_interaction(query: str, answer: str) -> str:
    """Render a full interaction `[BOS][Q]{query}[A]{answer}[EOS]` (what the chat template renders for a user message
    followed by an assistant message)."""
    return f"{BOS_TOKEN}{QUERY_TOKEN}{query}{ANSWER_TOKEN}{answer}{EOS_TOKEN}"


def _iter_texts(texts: Iterable[str]) -> Iterator[str]:
    if isinstance(texts, str):
        raise TypeError("`texts` must be an iterable of strings, not a single string.")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"`texts` item {index} is a {type(text).__name__}; expected str.")
        if text:
            yield text


def train_rxt_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer for RxT.

    Args:
        texts (`Iterable[str]`):
            Training corpus; consumed once.
        vocab_size (`int`, *optional*, defaults to 1024):
            Target vocabulary size, special tokens and the 256 byte symbols included (at least 267).
        min_frequency (`int`, *optional*, defaults to 2):
            Minimum pair frequency for a merge.

    Returns:
        [`PreTrainedTokenizerFast`]: the tokenizer, with [`RXT_SPECIAL_TOKENS`] at ids 0..10, the RxT chat template,
        right padding, and no automatically added special tokens.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r}: expected an integer >= {MIN_VOCAB_SIZE} "
            f"({len(RXT_SPECIAL_TOKENS)} special tokens + 256 byte symbols)."
        )
    if not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"min_frequency={min_frequency!r}: expected a non-negative integer.")

    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(RXT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_iter_texts(texts), trainer=trainer)

    for expected_id, token in enumerate(RXT_SPECIAL_TOKENS):
        if backend.token_to_id(token) != expected_id:  # guards the id layout the model config relies on
            raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, expected {expected_id}.")

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        extra_special_tokens=list(RXT_EXTRA_SPECIAL_TOKENS),
        chat_template=RXT_CHAT_TEMPLATE,
        model_max_length=DEFAULT_MODEL_MAX_LENGTH,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
    )


def _single_token_id(tokenizer, token: str) -> int | None:
    """Id of `token` if the tokenizer encodes it as exactly that one vocabulary entry, else None."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        return None
    if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        return None
    return token_id


def check_rxt_tokenizer(tokenizer) -> dict[str, int | None]:
    """Check that `tokenizer` carries the RxT special tokens and return their ids.

    `[PAD] [UNK] [BOS] [EOS] [MASK] [Q] [A]` are required, each as a single token; `[T] [C] [U] [I]` are optional.

    Returns:
        `dict[str, int | None]`: `pad_token_id`, `unk_token_id`, `bos_token_id`, `eos_token_id`, `mask_token_id`,
        `query_token_id`, `answer_token_id`, and `think_token_id`, `tool_call_token_id`, `tool_use_token_id`,
        `internal_token_id` (None when the token is absent).

    Raises:
        `ValueError`: if a required token is missing or is not a single token.
    """
    ids = {key: _single_token_id(tokenizer, token) for key, token in _REQUIRED_TOKEN_IDS.items()}
    missing = [token for key, token in _REQUIRED_TOKEN_IDS.items() if ids[key] is None]
    if missing:
        raise ValueError(
            f"tokenizer is missing RxT special tokens {missing} (each must encode as a single token); "
            f"expected all of {list(_REQUIRED_TOKEN_IDS.values())}. Build it with train_rxt_tokenizer or add them "
            "as special tokens (tokenizer.add_special_tokens)."
        )
    ids.update({key: _single_token_id(tokenizer, token) for key, token in _OPTIONAL_TOKEN_IDS.items()})
    return ids
