"""Stop signals that arrive before training's own handler exists (callbacks/stop.py installs it
once torch and Lightning are imported and the config is read, seconds after the process starts).

Without this, a SIGTERM or SIGUSR1 in those seconds (a Slurm time-limit signal on a job that
just started, a requeue) would kill the process with the signal's default action instead of
stopping it cleanly; with it, the signal is remembered and the run stops at its first safe
point (exit 4 when no checkpoint exists yet: nothing lost, the same command starts again).
"""

from __future__ import annotations

import signal

_received: list[str] = []


def _note(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def hold() -> None:
    """Remember SIGTERM / SIGUSR1 from now on (SIGINT keeps Python's KeyboardInterrupt)."""
    for name in ("SIGTERM", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, _note)


def take() -> str | None:
    """The first stop signal held so far (and forget them), or None."""
    first = _received[0] if _received else None
    _received.clear()
    return first
