"""JSONL files for ``trio-mapper map``: input lines in, Batch API output lines out, resumable output.

Input: one request per line, either in the OpenAI Batch API input format
(``{"custom_id", "method", "url", "body"}``) or a plain request body with an optional ``metadata`` value
(the openai-cookbook ``api_request_parallel_processor`` format), whose id is its line number (``line-17``).

Output: the Batch API output format, one line per request, in completion order. An output file is only
ever appended to with whole lines (one ``write`` + flush per line), so a crash can tear its *last* line at
most; `prepare_output` detects that on the next run and cuts it off.

Memory: the input is read in bounded chunks, cut into lines by `LineSplitter` (never the whole file); what is
kept across a file is the set of custom ids, the only state resuming needs.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import msgspec

#: Read size of the line-counting pass: large enough to run at disk speed, small enough to stay constant.
_COUNT_CHUNK_BYTES: Final = 1024 * 1024
#: Prefix of the ``id`` field of output lines, as in the Batch API's own output.
_OUTPUT_ID_PREFIX: Final = "batch_req_"
#: How every line we write starts (msgspec keeps the key order, adds no spaces): recognises a torn line.
_LINE_START: Final = b'{"id":"' + _OUTPUT_ID_PREFIX.encode()
#: Keys that mark a line as Batch API input rather than a plain request body (no OpenAI request body has them).
_BATCH_KEYS: Final = frozenset({"custom_id", "url", "body"})
_METHODS: Final = frozenset({"POST", "GET"})

_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()


# --- input ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputRequest:
    """One usable input line."""

    line_no: int
    custom_id: str
    method: str
    endpoint: str
    body: dict[str, Any]
    #: Carried to the output line untouched; only written when the input line had a ``metadata`` key.
    metadata: Any = None
    has_metadata: bool = False


@dataclass(frozen=True, slots=True)
class BadLine:
    """An input line that cannot become a request; ``custom_id`` is its own when it had a usable one."""

    line_no: int
    custom_id: str
    message: str
    metadata: Any = None
    has_metadata: bool = False


def line_id(line_no: int) -> str:
    """The custom id of a plain-body line: its 1-based line number."""
    return f"line-{line_no}"


_UTF8_BOM: Final = b"\xef\xbb\xbf"


def parse_line(raw: bytes | OverlongLine, line_no: int, default_endpoint: str) -> InputRequest | BadLine | None:
    """Turn one input line into a request, a `BadLine`, or None for a blank line.

    Args:
        raw: the line as read, with or without its line ending.
        line_no: its 1-based number, for ids and messages.
        default_endpoint: the endpoint of plain-body lines (the Batch format names its own ``url``).
    """
    own_id = line_id(line_no)
    if isinstance(raw, OverlongLine):
        return BadLine(
            line_no, own_id, f"line {line_no}: {raw.size} bytes long, more than a request can be (read no further)"
        )
    if not raw.strip():
        return None
    if line_no == 1 and raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]  # what some editors put at the start of a UTF-8 file
    try:
        value = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        return BadLine(line_no, own_id, f"line {line_no}: not valid JSON ({exc})")
    except RecursionError:
        return BadLine(line_no, own_id, f"line {line_no}: nested too deeply to decode (bodies nest a few levels)")
    if not isinstance(value, dict):
        return BadLine(line_no, own_id, f"line {line_no}: expected a JSON object, got {_json_type(value)}")
    has_metadata = "metadata" in value
    metadata = value.get("metadata")
    if _BATCH_KEYS & value.keys():
        return _parse_batch_line(value, line_no, metadata, has_metadata)
    body = {key: item for key, item in value.items() if key != "metadata"}  # metadata is never sent upstream
    if not body:
        return BadLine(line_no, own_id, f"line {line_no}: the request body is empty", metadata, has_metadata)
    return InputRequest(line_no, own_id, "POST", default_endpoint, body, metadata, has_metadata)


def _parse_batch_line(value: dict[str, Any], line_no: int, metadata: Any, has_metadata: bool) -> InputRequest | BadLine:
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        problem = "missing" if custom_id is None else f"not a non-empty string ({_json_type(custom_id)})"
        return BadLine(line_no, line_id(line_no), f"line {line_no}: custom_id is {problem}", metadata, has_metadata)

    def bad(message: str) -> BadLine:
        return BadLine(line_no, custom_id, f"line {line_no} ({custom_id}): {message}", metadata, has_metadata)

    method = value.get("method", "POST")
    if not isinstance(method, str) or method.upper() not in _METHODS:
        return bad(f"method must be POST (or GET), not {method!r}")
    url = value.get("url")
    if not isinstance(url, str) or not url.strip():
        return bad('url is missing: give the API path, e.g. "/v1/chat/completions"')
    if "://" in url:
        # The engine owns the host; an absolute URL is the most common mistake, so say so here, with the line.
        return bad(f'url must be a relative API path such as "/v1/chat/completions", not {url!r}')
    body = value.get("body")
    if not isinstance(body, dict):
        problem = "missing" if body is None else f"a JSON {_json_type(body)}, not an object"
        return bad(f"body is {problem}")
    return InputRequest(line_no, custom_id, method.upper(), url, body, metadata, has_metadata)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


@dataclass(frozen=True, slots=True)
class OverlongLine:
    """Stands for a line longer than `LineSplitter` keeps: only its size is known."""

    size: int


#: The longest line `LineSplitter` holds (what it stands for a longer one with is an `OverlongLine`): far more
#: than the engine accepts in a frame by default (4 MiB), so the engine's own limit is what applies, and a
#: stray line of gigabytes cannot take the memory with it.
MAX_LINE_BYTES: Final = 64 * 1024 * 1024


class LineSplitter:
    """Cuts bytes that arrive in chunks of any size into lines; it does no I/O, its caller reads.

    Lines keep their ``b"\\n"``, like iterating over a binary file; a line longer than a chunk is assembled
    from its parts, one longer than ``max_line_bytes`` is dropped as it comes and stood for by an
    `OverlongLine`. `finish` returns a last line that has no newline.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max_line_bytes = max_line_bytes
        #: The start of a line whose newline has not arrived yet, in parts (joined once, when it ends).
        self._partial: list[bytes] = []
        self._partial_size = 0
        #: The current line is over the limit: its parts are counted, not kept.
        self._overlong = False

    def feed(self, chunk: bytes) -> list[bytes | OverlongLine]:
        """The lines that `chunk` completes, in order (none if it holds no newline)."""
        lines: list[bytes | OverlongLine] = []
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            self._add(chunk[start : end + 1])
            lines.append(self._take())
            start = end + 1
        if start < len(chunk):
            self._add(chunk[start:])
        return lines

    def finish(self) -> bytes | OverlongLine | None:
        """At the end of the input: its last line if that had no newline, else None."""
        return self._take() if self._partial_size else None

    def _add(self, part: bytes) -> None:
        self._partial_size += len(part)
        if self._partial_size > self._max_line_bytes:
            self._overlong = True
            self._partial.clear()
        elif not self._overlong:
            self._partial.append(part)

    def _take(self) -> bytes | OverlongLine:
        line: bytes | OverlongLine = OverlongLine(self._partial_size) if self._overlong else b"".join(self._partial)
        self._partial.clear()
        self._partial_size, self._overlong = 0, False
        return line


def count_lines(path: Path) -> int:
    """How many lines ``path`` has (a last line without a newline counts), read in fixed-size chunks."""
    count = 0
    last = b"\n"
    with path.open("rb") as file:
        while chunk := file.read(_COUNT_CHUNK_BYTES):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


# --- output records ------------------------------------------------------------------------------------------


def _response(status: int | None, request_id: str | None, body: Any) -> dict[str, Any]:
    return {"status_code": status, "request_id": request_id, "body": body}


def success_record(
    custom_id: str, *, status: int, request_id: str | None, body: Any, metadata: Any = None, has_metadata: bool = False
) -> dict[str, Any]:
    """A Batch API output line for a request the upstream answered successfully."""
    record: dict[str, Any] = {
        "id": _OUTPUT_ID_PREFIX + secrets.token_hex(12),
        "custom_id": custom_id,
        "response": _response(status, request_id, body),
        "error": None,
    }
    if has_metadata:
        record["metadata"] = metadata
    return record


def failure_record(
    custom_id: str,
    *,
    code: str,
    message: str,
    status: int | None = None,
    request_id: str | None = None,
    body: Any = None,
    metadata: Any = None,
    has_metadata: bool = False,
) -> dict[str, Any]:
    """A Batch API output line for a request that failed; ``response`` is set when the upstream answered."""
    record: dict[str, Any] = {
        "id": _OUTPUT_ID_PREFIX + secrets.token_hex(12),
        "custom_id": custom_id,
        "response": None if status is None else _response(status, request_id, body),
        "error": {"code": code, "message": message},
    }
    if has_metadata:
        record["metadata"] = metadata
    return record


def encode_record(record: dict[str, Any]) -> bytes:
    """One output line, newline included (JSON never contains a raw newline, so a line is a record)."""
    return _encoder.encode(record) + b"\n"


# --- the output file: resume and append ----------------------------------------------------------------------


class OutputFileError(Exception):
    """The output file exists but is not a `trio-mapper map` output: it is left untouched."""


class _OutputResponse(msgspec.Struct):
    status_code: int | None = None


class _OutputLine(msgspec.Struct):
    """What resuming needs from an output line. Other fields (the response body) are validated JSON but never
    built into objects, so scanning a file of large responses stays cheap."""

    custom_id: str
    response: _OutputResponse | None
    error: msgspec.Raw

    @property
    def succeeded(self) -> bool:
        # The status check matters for files written by the Batch API itself, which may pair an HTTP error
        # response with a null error.
        status = self.response.status_code if self.response is not None else None
        return bytes(self.error) == b"null" and status is not None and 200 <= status < 300


_line_decoder: Final = msgspec.json.Decoder(_OutputLine)


@dataclass(slots=True)
class OutputScan:
    """What a previous run left in the output file, after `prepare_output` cleaned it up."""

    #: custom ids answered successfully: skipped by this run.
    done: set[str] = field(default_factory=set)
    #: failed lines removed (their requests are retried by this run).
    dropped_failures: int = 0
    #: duplicate success lines removed (only possible if the file was edited by hand).
    dropped_duplicates: int = 0
    #: bytes of a torn last line cut off (a run killed mid-write).
    torn_bytes: int = 0


def _iter_lines(file: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(line number, start offset, raw line) for each line of a binary file, one line in memory at a time."""
    offset = 0
    for line_no, raw in enumerate(file, start=1):
        yield line_no, offset, raw
        offset += len(raw)


def prepare_output(path: Path) -> OutputScan:
    """Read what a previous run wrote to ``path`` and leave only lines that will stay valid.

    Successful lines are kept (their ids are skipped by this run). Failed lines are removed, since this run
    retries those ids and appends their new outcome; so are duplicate successes. A torn last line (no
    newline: the previous run was killed mid-write) is cut off. When lines must go, the kept ones are
    copied to a temporary file in the same directory, synced, and renamed over ``path`` (atomic: a crash
    leaves either the old file or the new one). A missing file is fine: there is nothing to resume.

    Raises:
        OutputFileError: a line is not a Batch API output line (nor a torn one); the file is not touched.
    """
    scan = OutputScan()
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return scan
    duplicate_lines: set[int] = set()
    torn_line: int | None = None
    torn_at = 0
    unterminated = False
    with file:
        for line_no, offset, raw in _iter_lines(file):
            if not raw.strip():
                continue
            if raw.endswith(b"\n"):
                record = _decode_output_line(path, line_no, raw)
            else:
                # The last line, without its newline. Usually torn: we write each line and its newline at once,
                # so a kill -9 can only cut it short. Cut off only what could be the start of one of our lines
                # (someone else's file is left alone); a complete record that just lacks its newline is kept.
                try:
                    record = _line_decoder.decode(raw)
                except msgspec.DecodeError:
                    if not (raw.startswith(_LINE_START) or _LINE_START.startswith(raw)):
                        _decode_output_line(path, line_no, raw)  # raises OutputFileError
                    torn_line, torn_at, scan.torn_bytes = line_no, offset, len(raw)
                    break
                unterminated = True
            if not record.succeeded:
                scan.dropped_failures += 1
            elif record.custom_id in scan.done:
                scan.dropped_duplicates += 1
                duplicate_lines.add(line_no)
            else:
                scan.done.add(record.custom_id)
    if scan.dropped_failures or scan.dropped_duplicates:
        _rewrite_keeping_successes(path, duplicate_lines, torn_line)
    elif torn_line is not None or unterminated:
        with path.open("r+b") as repaired:
            if torn_line is not None:
                repaired.truncate(torn_at)
            else:
                repaired.seek(0, os.SEEK_END)
                repaired.write(b"\n")  # so that this run's first line does not run into it
            repaired.flush()
            os.fsync(repaired.fileno())
    return scan


def _decode_output_line(path: Path, line_no: int, raw: bytes) -> _OutputLine:
    try:
        return _line_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise OutputFileError(
            f"{path}:{line_no} is not a Batch API output line ({exc}); refusing to modify the file: "
            "give another output path, or remove the file to start over"
        ) from None


def _rewrite_keeping_successes(path: Path, duplicate_lines: set[int], torn_line: int | None) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, path.open("rb") as source:
            for line_no, _, raw in _iter_lines(source):
                if line_no == torn_line:
                    break
                if not raw.strip() or line_no in duplicate_lines:
                    continue
                if _line_decoder.decode(raw).succeeded:
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the rename is atomic, but only the directory's sync persists it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputWriter:
    """Appends whole output lines: one write and a flush per line, so another process (or the next run after
    a crash) sees complete lines only, save a torn last line after a kill -9. `close` syncs to disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = path.open("ab")
        self.lines_written = 0

    def write(self, record: dict[str, Any]) -> None:
        assert self._file is not None, "write() after close()"
        self._file.write(encode_record(record))
        self._file.flush()
        self.lines_written += 1

    def close(self) -> None:
        """Flush and fsync, then close. Safe to call twice."""
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()


__all__ = [
    "MAX_LINE_BYTES",
    "BadLine",
    "InputRequest",
    "LineSplitter",
    "OutputFileError",
    "OutputScan",
    "OutputWriter",
    "OverlongLine",
    "count_lines",
    "encode_record",
    "failure_record",
    "line_id",
    "parse_line",
    "prepare_output",
    "success_record",
]
