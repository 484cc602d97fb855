"""Names: the one rule by which two label names mean the same structure, and the one rule
that makes a case or model name safe and unique as a file name.

Names match ignoring case and the spelling of separators ("Left_kidney" == "left kidney" ==
"LEFT-KIDNEY"). Head surgery (:mod:`TransferSegLib.transfer`), ``transferseg evaluate`` and
the Slicer module all match label names by :func:`normalised`. No torch here.
"""

from __future__ import annotations

import re


def normalised(name: str) -> str:
    """The form two label names share when they name the same structure."""
    return re.sub(r"[\s_\-]+", " ", str(name).strip()).casefold()


def unique_name(name: str, taken: set[str]) -> str:
    """``name`` made safe for a file name (letters, digits, ``. _ -``, no leading or trailing
    dot, dash or underscore) and different from every name in ``taken``, which it is added to:
    "CT 1/2" -> "CT_1_2", then "CT_1_2-2", ...; an empty result is "case"."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-") or "case"
    candidate, number = stem, 1
    while candidate in taken:
        number += 1
        candidate = f"{stem}-{number}"
    taken.add(candidate)
    return candidate
