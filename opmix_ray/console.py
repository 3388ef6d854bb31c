"""The one place progress lines are printed: `[opmix HH:MM:SS] message`, flushed so that a redirected
log shows each line as it happens."""
from __future__ import annotations

import time


def say(msg: str) -> None:
    print(f"[opmix {time.strftime('%H:%M:%S')}] {msg}", flush=True)
