"""The SGLang release this package's host layer is written against, and the backend switch.

``SGLANG_DFLASH_BACKEND=upstream`` keeps SGLang's built-in DFLASH (for side-by-side runs
and as a test oracle); anything else selects this package's worker.
"""

from __future__ import annotations

import os
from typing import Optional

from .. import SGLANG_VERSION

BACKEND_ENV = "SGLANG_DFLASH_BACKEND"
OURS, UPSTREAM = "sglang-dflash", "upstream"


class SGLangVersionError(RuntimeError):
    """The installed SGLang is not the release this package's glue targets."""


def installed_sglang_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        return None


def check_version() -> None:
    found = installed_sglang_version()
    if found != SGLANG_VERSION:
        raise SGLangVersionError(
            f"sglang-dflash supports SGLang {SGLANG_VERSION} only, found {found}; "
            f"install sglang=={SGLANG_VERSION} or set {BACKEND_ENV}={UPSTREAM} to use SGLang's built-in DFLASH"
        )


def selected_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value in ("", OURS, "ours", "sglang_dflash"):
        return OURS
    if value == UPSTREAM:
        return UPSTREAM
    raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {OURS!r}, {UPSTREAM!r}")
