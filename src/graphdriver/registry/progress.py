"""Progress of a pull or a push: events, and the two ways they are shown.

Pull and push report :class:`Event` objects to a callable (:data:`Sink`); they never print.

=============  =====================================================================================
``status``     what happened to one blob (``digest``; ``size`` its bytes):
               pull: ``exists`` (in the store already, not downloaded), ``waiting``, ``downloading``,
               ``downloaded``, ``applying``, ``applied``;
               push: ``exists`` (the registry has it), ``mounted`` (cross-repository mount),
               ``uploading``, ``uploaded``
``current``    bytes done so far for ``downloading`` / ``uploading`` (sent at most every
               :attr:`Throttle.interval` seconds per blob, and at the end)
``message``    free text (``resolved``, ``manifest pushed``), no digest
=============  =====================================================================================

:class:`JsonLines` writes each event as one JSON object per line (``{"event": "status",
"digest": ..., "status": ..., "current": ..., "size": ...}``); :class:`TerminalProgress` keeps one
line per blob up to date on a terminal, as ``docker pull`` does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["Event", "JsonLines", "Sink", "TerminalProgress", "Throttle", "null_sink"]

_MiB = 1 << 20
_FINAL = ("downloaded", "applied", "uploaded", "exists", "mounted")


@dataclass(frozen=True)
class Event:
    """One progress event (see the module docstring for the kinds)."""

    event: str
    digest: str | None = None
    status: str | None = None
    current: int | None = None
    size: int | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


Sink = Callable[[Event], None]


def null_sink(event: Event) -> None:
    """Ignore progress."""


class Throttle:
    """Turns a byte counter into ``current`` events, at most one per ``interval`` per blob."""

    interval = 0.2

    def __init__(self, sink: Sink, digest: str, status: str, size: int | None) -> None:
        self._sink = sink
        self._digest = digest
        self._status = status
        self._size = size
        self._done = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._done = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = time.monotonic()
            if now - self._last < self.interval and (self._size is None or self._done < self._size):
                return
            self._last = now
            done = self._done
        self._sink(Event("progress", self._digest, self._status, done, self._size))


class JsonLines:
    """Write every event as a JSON line to ``stream`` (thread-safe)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.to_json(), separators=(",", ":"))
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12] or digest


def _human(n: int) -> str:
    return f"{n / _MiB:.1f} MiB"


class TerminalProgress:
    """One line per blob on a terminal, redrawn in place (ANSI cursor movement).

    Lines are drawn at most every ``interval`` seconds, and once more by :meth:`close`.
    """

    interval = 0.1

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._order: list[str] = []
        self._lines: dict[str, str] = {}
        self._drawn = 0
        self._last = 0.0

    def __call__(self, event: Event) -> None:
        with self._lock:
            if event.digest is None:
                if event.message:
                    self._order.append(f"#{len(self._order)}")
                    self._lines[self._order[-1]] = event.message
                    self._draw(force=True)
                return
            if event.digest not in self._lines:
                self._order.append(event.digest)
            self._lines[event.digest] = self._format(event)
            self._draw(force=event.event == "status")

    @staticmethod
    def _format(event: Event) -> str:
        assert event.digest is not None
        label = f"{_short(event.digest)}: {event.status or ''}"
        if event.size is not None and event.status in _FINAL:
            return f"{label:<26} {_human(event.size)}"
        if event.current is not None and event.size:
            pct = min(100, event.current * 100 // event.size)
            width = 30
            filled = width * pct // 100
            bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
            return f"{label:<26} [{bar}] {_human(event.current)}/{_human(event.size)}"
        return label

    def _draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")
        for key in self._order:
            out.append("\x1b[2K" + self._lines[key] + "\n")
        self._drawn = len(self._order)
        try:
            self._stream.write("".join(out))
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        with self._lock:
            self._draw(force=True)
