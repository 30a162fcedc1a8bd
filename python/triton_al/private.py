"""Files with flagged images (the outbox, the project store, logs) are private by default.

The commands that create them (`serve`, `uploader`) set their process's umask from
`$TRITON_AL_UMASK` (octal; default 077: the owner only); a team that shares them with a
group sets e.g. 027.
"""

from __future__ import annotations

import os

UMASK_ENV = "TRITON_AL_UMASK"
DEFAULT_UMASK = 0o077


def umask_setting() -> int:
    raw = os.environ.get(UMASK_ENV, "").strip()
    if not raw:
        return DEFAULT_UMASK
    try:
        mask = int(raw, 8)
    except ValueError:
        raise ValueError(f"{UMASK_ENV}={raw!r}: expected an octal umask such as 077 or 027") from None
    if not 0 <= mask <= 0o777:
        raise ValueError(f"{UMASK_ENV}={raw!r}: expected an octal umask between 000 and 777")
    return mask


def keep_files_private() -> int:
    """Set this process's umask (see the module docstring); returns it."""
    mask = umask_setting()
    os.umask(mask)
    return mask
