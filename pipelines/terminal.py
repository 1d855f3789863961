"""Model output on a terminal: control characters shown, never obeyed.

A completion is untrusted text. Printed raw, `\\x1b]...` or `\\x1b[2J` would retitle the window,
clear the screen or hide lines from the person reading it.
"""

from __future__ import annotations

import re

# C0 and C1 controls but newline and tab, and DEL.
_CONTROL = re.compile("[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f]")


def printable(text: str) -> str:
    """`text` with every control character but newline and tab written as an escape.

    >>> printable("ok\\n\\x1b[2Jgone\\ttab")
    'ok\\n\\\\x1b[2Jgone\\ttab'
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
