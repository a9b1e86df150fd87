"""One log formatter for everything the application writes: a record is one line, whatever a
caller sent.

Callers choose task ids, labels, label-config names, request paths, URLs and header values, and
several of them reach log messages. A CR or LF among them would start a line of the caller's
making, one that reads like a record of ours (``[date] [ERROR] ...``); an escape sequence would
rewrite what a terminal shows. :class:`SafeFormatter` therefore writes

* the message (format string and arguments, after interpolation) with every control character
  escaped: ``\\r``, ``\\n``, ``\\t`` as those two characters, the others as ``\\xNN`` or
  ``\\uNNNN`` (C0, DEL, C1, and the Unicode line and paragraph separators);
* a traceback or stack below it with the same characters escaped, each of its lines indented, so
  that no line after a record's first can pass for a record of its own.

It wraps whatever layout a handler already has (:meth:`SafeFormatter.wrapping`), which is how
gunicorn's error and access logs get it (:class:`ml_backend.worker.SafeGunicornLogger`).
:func:`configure_logging` installs it on the root handler: the backend's processes (gunicorn
workers, the development server) and the CLI (``labeler.commands.common.setup_logging``).
"""

from __future__ import annotations

import copy
import logging
import re
import sys
from typing import IO

LOG_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
_INDENT = "    "


def escape(text: str) -> str:
    """``text`` on one line: control characters written as escapes (see the module)."""
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _indented(block: str) -> str:
    """A traceback or stack: each line escaped and indented."""
    return "\n".join(_INDENT + escape(line) for line in block.splitlines())


class SafeFormatter(logging.Formatter):
    """A formatter whose records are one line each, plus an indented traceback (see the module).

    ``inner`` lays the record out (its format, date format and style); by default this class's
    own ``fmt`` does.
    """

    def __init__(
        self,
        fmt: str | None = LOG_FORMAT,
        datefmt: str | None = None,
        inner: logging.Formatter | None = None,
    ) -> None:
        super().__init__(fmt, datefmt)
        self.inner = inner

    @classmethod
    def wrapping(cls, formatter: logging.Formatter | None) -> SafeFormatter:
        """The same layout as ``formatter`` (None: logging's default), made safe."""
        if isinstance(formatter, SafeFormatter):
            return formatter
        return cls(inner=formatter or logging.Formatter())

    def format(self, record: logging.LogRecord) -> str:
        safe = copy.copy(record)
        safe.msg = escape(record.getMessage())
        safe.args = None
        safe.exc_info = None
        safe.exc_text = None
        safe.stack_info = None
        layout = self.inner or super()
        line = escape(layout.format(safe))  # the layout's own fields (names, levels) included
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        elif record.exc_text:
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        return "\n".join([line, *(_indented(block) for block in extra if block)])


def configure_logging(
    level: int | str, fmt: str = LOG_FORMAT, stream: IO[str] | None = None
) -> None:
    """Log to ``stream`` (stderr) through :class:`SafeFormatter` with layout ``fmt`` at
    ``level``, as :func:`logging.basicConfig` does: nothing changes when the root logger already
    has a handler (a host application's, or a test runner's)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(SafeFormatter(fmt))
    logging.basicConfig(
        level=level.upper() if isinstance(level, str) else level, handlers=[handler]
    )
