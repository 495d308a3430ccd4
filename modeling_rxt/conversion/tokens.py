"""The token ids of the converted model (docs/conversion.md#token-ids): from a whole-model `tokenizer_config`, a
`tokenizer.json` (given or found beside the inputs), or the reference tokenizer trainer's usual layout.

The tokens and their config fields are `modeling_rxt.tokenization_rxt.RXT_TOKEN_ID_FIELDS`."""

from __future__ import annotations

import json
from pathlib import Path

from ..tokenization_rxt import RXT_SPECIAL_TOKENS, RXT_TOKEN_ID_FIELDS
from .folders import ConversionError
from .report import Report

TOKEN_ID_FIELDS = tuple(RXT_TOKEN_ID_FIELDS)
# The converter requires these five; the others may be absent from a reference tokenizer.
REQUIRED_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "query_token_id", "answer_token_id")
# The reference tokenizer-trainer layout (docs/spec.md#special-tokens): the project's first seven tokens,
# [PAD]=0 … [A]=6.
REFERENCE_TOKENS = RXT_SPECIAL_TOKENS[:7]
USUAL_TOKEN_IDS = {
    field: REFERENCE_TOKENS.index(token) if token in REFERENCE_TOKENS else None
    for field, token in RXT_TOKEN_ID_FIELDS.items()
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)


def tokenizer_json_ids(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = {}
    model_vocab = (data.get("model") or {}).get("vocab")
    if isinstance(model_vocab, dict):
        vocab.update(model_vocab)
    elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
        vocab.update({entry[0]: i for i, entry in enumerate(model_vocab) if isinstance(entry, (list, tuple))})
    for token in data.get("added_tokens") or []:
        if isinstance(token, dict) and "content" in token and "id" in token:
            vocab[token["content"]] = token["id"]
    return {field: vocab.get(string) for field, string in RXT_TOKEN_ID_FIELDS.items()}


def find_tokenizer(dirs: list[Path]) -> Path | None:
    for d in dirs:
        if d is not None and (Path(d) / "tokenizer.json").is_file():
            return Path(d)
    return None


def resolve_token_ids(tokenizer, input_dirs: list[Path], whole_cfg: dict | None, report: Report):
    """`(token_ids, tokenizer_dir)`: the config's token-id fields and the folder whose `tokenizer.json` was used
    (`None` when none was found). `tokenizer` is the `--tokenizer` folder; the input folders are searched after it."""
    token_ids, tok_dir, tok_source = {}, None, None
    search_dirs = [Path(tokenizer)] if tokenizer else []
    search_dirs += list(input_dirs)
    if tokenizer and not (Path(tokenizer) / "tokenizer.json").is_file():
        raise ConversionError(f"--tokenizer folder '{tokenizer}' has no tokenizer.json.")
    tok_dir = find_tokenizer(search_dirs)
    tok_ids = tokenizer_json_ids(tok_dir / "tokenizer.json") if tok_dir else None
    if whole_cfg is not None and isinstance(whole_cfg.get("tokenizer_config"), dict):
        tc = whole_cfg["tokenizer_config"]
        unknown = [k for k in tc if k not in TOKEN_ID_FIELDS]
        if unknown:
            raise ConversionError(
                f"whole-model tokenizer_config has unknown fields {unknown}; expected {list(TOKEN_ID_FIELDS)}."
            )
        for field in TOKEN_ID_FIELDS:
            if field in tc:
                token_ids[field] = tc[field]
            elif tok_ids is not None:
                token_ids[field] = tok_ids[field]
            else:
                token_ids[field] = USUAL_TOKEN_IDS[field]
                if USUAL_TOKEN_IDS[field] is not None:
                    report.default("model", field, USUAL_TOKEN_IDS[field], "usual reference tokenizer id")
        tok_source = "whole-model tokenizer_config" + (f" (+ {tok_dir / 'tokenizer.json'})" if tok_ids else "")
    elif tok_ids is not None:
        absent = [RXT_TOKEN_ID_FIELDS[f] for f in REQUIRED_TOKENS if tok_ids[f] is None]
        if absent:
            raise ConversionError(
                f"{tok_dir / 'tokenizer.json'} lacks the RxT special tokens {absent}; expected "
                f"{[RXT_TOKEN_ID_FIELDS[f] for f in REQUIRED_TOKENS]}."
            )
        token_ids = dict(tok_ids)
        tok_source = str(tok_dir / "tokenizer.json")
    else:
        token_ids = dict(USUAL_TOKEN_IDS)
        tok_source = (
            "none: no tokenizer_config and no tokenizer.json found; the usual reference ids "
            + " ".join(f"{RXT_TOKEN_ID_FIELDS[f]}={i}" for f, i in USUAL_TOKEN_IDS.items() if i is not None)
            + " are used"
        )
        report.note("token ids: " + tok_source)
    report.data["token_ids"] = {
        "values": token_ids,
        "source": tok_source,
        "tokenizer_dir": str(tok_dir.resolve()) if tok_dir else None,
    }
    return token_ids, tok_dir
