"""Model output printed by `grpo ask` and `grpo ledger` shows control characters, never obeys them."""

from __future__ import annotations

from pipelines.terminal import printable


def test_escape_sequences_are_shown_not_sent():
    hostile = "answer\x1b]0;owned\x07\x1b[2J\x1b[1A\rhidden\x9b31m\nnext\tcol"
    shown = printable(hostile)
    assert not any(ord(c) < 32 and c not in "\n\t" or 0x7F <= ord(c) <= 0x9F for c in shown)
    assert shown == "answer\\x1b]0;owned\\x07\\x1b[2J\\x1b[1A\\x0dhidden\\x9b31m\nnext\tcol"
    assert printable("plain ünïcode 42") == "plain ünïcode 42"
