"""The tokenizer keys llama.cpp needs, read from ``tokenizer.json`` without transformers.

Token list and types follow ``convert_hf_to_gguf.py``'s ``get_vocab_base`` (ids up to the model's
``vocab_size``, gaps as ``[PADn]`` UNUSED, added tokens CONTROL or USER_DEFINED); merges, special ids,
add_bos/add_eos and the chat template come from ``gguf.SpecialVocab`` like the converter's.
llama.cpp picks its pre-tokenizer regex by the ``tokenizer.ggml.pre`` name; the converter finds the
name by hashing the tokenizer's output on a probe text, which only works for published tokenizers,
so we recognise the split regex itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adaptr.errors import InvalidInputError

# Split regexes of the tokenizer.json files llama.cpp knows by these pre-tokenizer names.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_BY_REGEX = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}
_FIX = "convert it with llama.cpp's convert_hf_to_gguf.py instead"


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens some models forget to mark special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _pre_name(tok: dict[str, Any], where: Path) -> str:
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _PRE_BY_REGEX:
            return _PRE_BY_REGEX[regex]
    raise InvalidInputError(
        f"{where}: pre-tokenizer {json.dumps(pre)[:80]} is not one adaptr can name for llama.cpp "
        f"(GPT-2, Llama 3 and Qwen2 byte-level BPE are); {_FIX}"
    )


class Vocab:
    """Everything the ``tokenizer.*`` keys need, checked before any file is written."""

    def __init__(self, folder: Path, vocab_size: int) -> None:
        where = folder / "tokenizer.json"
        try:
            tok = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{where}: cannot be read as JSON ({exc}); fix or remove it") from None
        model = tok.get("model") or {}
        byte_level = (
            any(
                s.get("type") == "ByteLevel"
                for s in [
                    tok.get("decoder") or {},
                    *((tok.get("pre_tokenizer") or {}).get("pretokenizers") or []),
                ]
            )
            or (tok.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
        )
        if model.get("type") != "BPE" or not byte_level:
            raise InvalidInputError(
                f"{where}: a {model.get('type')} tokenizer without byte-level pre-tokenization; "
                f"adaptr writes byte-level BPE (GPT-2 style) vocabularies only; {_FIX}"
            )
        self.pre = _pre_name(tok, where)
        by_id: dict[int, str] = {int(i): t for t, i in (model.get("vocab") or {}).items()}
        added: dict[int, dict[str, Any]] = {int(a["id"]): a for a in tok.get("added_tokens") or []}
        for i, a in added.items():
            by_id[i] = a["content"]
        if by_id and max(by_id) >= vocab_size:
            raise InvalidInputError(
                f"{where}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}; "
                "the tokenizer does not belong to this model"
            )
        import gguf

        T = gguf.TokenType
        self.tokens: list[str] = []
        self.types: list[int] = []
        for i in range(vocab_size):
            token = by_id.get(i)
            if token is None:
                self.tokens.append(f"[PAD{i}]")
                self.types.append(T.UNUSED)
                continue
            if i in added:
                special = added[i].get("special") or _looks_special(token)
                self.types.append(T.CONTROL if special else T.USER_DEFINED)
            else:
                self.types.append(T.NORMAL)
            self.tokens.append(token)
        self.special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
        if not self.special.merges:
            raise InvalidInputError(f"{where}: holds no BPE merges; {_FIX}")

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)


def read_vocab(folder: Path, vocab_size: int) -> Vocab | None:
    """The folder's vocabulary, or None when it ships no ``tokenizer.json``."""
    if not (folder / "tokenizer.json").is_file():
        return None
    return Vocab(folder, vocab_size)
