"""Incremental server-sent-events parsing: bytes as they arrive in, ``data`` payloads out.

Network reads split events anywhere (mid-line, mid-UTF-8 character) and may hold several events,
so the decoder buffers bytes and emits an event's data at the blank line that ends it, as the SSE
spec says: several ``data:`` lines of one event join with newlines; comments (``:``) and the
``event`` / ``id`` / ``retry`` fields are ignored. Lines end with LF or CRLF.
"""

from __future__ import annotations


class SSEDecoder:
    """Feed it raw bytes; it returns the data of every event completed so far."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Add ``chunk`` and return the payloads of the events it completed, in order."""
        self._buf += chunk
        out: list[str] = []
        start = 0
        while (end := self._buf.find(b"\n", start)) >= 0:
            line = bytes(self._buf[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line.decode("utf-8", errors="replace"), out)
        del self._buf[:start]
        return out

    def flush(self) -> list[str]:
        """At end of stream: the payload of a last event that was not closed by a blank line."""
        out: list[str] = []
        if self._buf:
            self._line(bytes(self._buf).decode("utf-8", errors="replace").rstrip("\r"), out)
            self._buf.clear()
        self._line("", out)
        return out

    def _line(self, line: str, out: list[str]) -> None:
        if not line:
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
