"""Label names: the one rule by which two names mean the same structure, and file-safe names.

Names match ignoring case and the spelling of separators ("Left_kidney" == "left kidney" ==
"LEFT-KIDNEY"). Head surgery (:mod:`TransferSegLib.transfer`), ``transferseg evaluate`` and
the Slicer module all match label names by :func:`normalised`. No torch here.
"""

from __future__ import annotations

import re


def normalised(name: str) -> str:
    """The form two label names share when they name the same structure."""
    return re.sub(r"[\s_\-]+", " ", str(name).strip()).casefold()
