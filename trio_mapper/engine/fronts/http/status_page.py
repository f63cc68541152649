"""The live status page: ``GET /`` and its static files, from ``static/`` beside this module.

The page and its files reveal nothing: they are the same bytes for every engine. So they need no client key
over TCP (over the Unix socket the uid/gid allow-lists apply, as to every route); the page asks for a key and
sends it on its polls of ``/status.json``, which needs one like ``/metrics``.

Only the files of `ASSETS` are served, each at a fixed path that carries a digest of its content
(``/static/<digest>/<name>``): the path changes whenever the file does, so the browser may keep it for good,
and no path is ever built from the request. The page, which names those paths, is never cached.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Final

from trio_mapper.engine.fronts.http.app import Operation, OperationReply

log = logging.getLogger("trio_mapper.http")

#: The files under ``static/`` that are served, with their content types; nothing else there is.
ASSETS: Final = {
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}
#: The page's template: its ``/static/<name>`` references are rewritten to the served paths.
PAGE: Final = "status.html"
#: The page runs only its own files and talks only to its own engine; no frame may hold it.
PAGE_HEADERS: Final = (
    ("cache-control", "no-store"),
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
)
#: A static file's path names its content, so it never goes stale.
ASSET_HEADERS: Final = (
    ("cache-control", "public, max-age=31536000, immutable"),
    ("x-content-type-options", "nosniff"),
)


def status_page_routes() -> dict[str, Operation]:
    """``/`` and the static files' paths, as operations for the HTTP front; none if the files are missing (a
    broken installation costs the page, not the engine)."""
    try:
        static = resources.files(__package__).joinpath("static")
        contents = {name: static.joinpath(name).read_bytes() for name in [*ASSETS, PAGE]}
    except OSError as exc:
        log.error("the status page's files cannot be read (%s): GET / is not served", exc)
        return {}
    page = contents[PAGE].decode()
    routes: dict[str, Operation] = {}
    for name, content_type in ASSETS.items():
        path = f"/static/{hashlib.sha256(contents[name]).hexdigest()[:16]}/{name}"
        page = page.replace(f'"/static/{name}"', f'"{path}"')
        routes[path] = Operation(
            _constant(content_type, contents[name]), keyless=True, headers=ASSET_HEADERS, listed=False
        )
    routes["/"] = Operation(_constant("text/html; charset=utf-8", page.encode()), keyless=True, headers=PAGE_HEADERS)
    return routes


def _constant(content_type: str, body: bytes) -> Callable[[], Awaitable[OperationReply]]:
    async def respond() -> OperationReply:
        return 200, content_type, body

    return respond
