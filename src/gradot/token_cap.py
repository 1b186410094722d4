"""The hard cap on tokens per encoded text, applied wherever gradot tokenizes (fine-tuning rows,
evaluation requests): no honest tokenizer makes more than a few tokens of one character, so a text
encoding to more is refused in one line, whatever tokenizer was used (the emulator's shipped one
is also probed against the same per-character bound before it is loaded)."""

from __future__ import annotations

from .errors import TokenCapError

MAX_TOKENS_PER_CHAR = 8  # byte-level BPE: at most 4 per code point


#: Tokens a text may encode to beyond MAX_TOKENS_PER_CHAR per character (special tokens, a prefix).
TOKEN_SLACK = 16


def check_token_count(count: int, text: str, what: str) -> None:
    """Refuse ``count`` tokens of ``text`` beyond MAX_TOKENS_PER_CHAR per character plus TOKEN_SLACK
    (``what`` names the text in the one-line error)."""
    cap = MAX_TOKENS_PER_CHAR * len(text) + TOKEN_SLACK
    if count > cap:
        raise TokenCapError(f"{what}: {count:,} tokens of {len(text):,} characters, more than the {cap:,} any text "
                            f"may encode to ({MAX_TOKENS_PER_CHAR} per character plus {TOKEN_SLACK}): the tokenizer "
                            f"expands text")
