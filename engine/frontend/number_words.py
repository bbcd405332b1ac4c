"""English cardinal words for digit strings, as the reference frontend spells them.

The reference English path replaces every maximal run of ``str.isdigit()`` characters by
``inflect.engine().number_to_words(run)`` (inflect 7.3.1, default arguments). This module produces
the same words without the dependency: three-digit groups, "and" after a non-empty hundreds place,
hyphenated tens ("twenty-three"), groups separated by ", " and, when the last group is a single word
below one hundred, joined by " and " instead ("one thousand and two"). Checked against inflect 7.3.1
on every integer below 200,000 plus random strings up to 36 digits.
"""
from __future__ import annotations

import unicodedata

_UNITS = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ("", " thousand", " million", " billion", " trillion", " quadrillion", " quintillion",
           " sextillion", " septillion", " octillion", " nonillion", " decillion")


def _tens(t: int, u: int) -> str:
    if t == 1:
        return _TEENS[u]
    return _TENS[t] + ("-" if t and u else "") + _UNITS[u]


def _group(h: int, t: int, u: int) -> str:
    if h:
        return f"{_UNITS[h]} hundred" + (f" and {_tens(t, u)}" if t or u else "")
    return _tens(t, u)


def number_to_words(digits: str) -> str:
    """Words for a string of decimal digits (any Unicode decimal digits; leading zeros ignored).

    ``"1002"`` -> ``"one thousand and two"``; ``"1234567"`` -> ``"one million, two hundred and
    thirty-four thousand, five hundred and sixty-seven"``; ``"0"``/``"000"`` -> ``"zero"``.
    Characters that are ``isdigit()`` but not decimal digits (e.g. superscripts) are dropped, as
    inflect drops them; an empty result reads "zero". Numbers above 36 digits (beyond "decillion",
    where inflect raises) are read digit by digit."""
    values = [unicodedata.decimal(c) for c in digits if unicodedata.decimal(c, None) is not None]
    while values and values[0] == 0:
        values.pop(0)
    if not values:
        return "zero"
    if len(values) > 3 * len(_SCALES):
        return " ".join(_UNITS[v] or "zero" for v in values)
    # Three-digit groups from the right, most significant first.
    values = [0] * (-len(values) % 3) + values
    groups = [values[i:i + 3] for i in range(0, len(values), 3)]
    parts = []
    for k, (h, t, u) in enumerate(groups):
        scale = len(groups) - 1 - k
        if h or t or u:
            parts.append(_group(h, t, u) + _SCALES[scale])
    if len(parts) > 1 and " " not in parts[-1]:
        # The last group is one word (< 100, no scale): "X thousand and two".
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return ", ".join(parts)
