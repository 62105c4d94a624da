"""The chat page of ``ember serve``: ``GET /`` and its static files under ``/ui/``.

The page (``ember/server/static/``: plain HTML, CSS and ES-module JavaScript, no build step) talks
only to this server's OpenAI routes. It is served by a small ASGI layer placed in front of the app,
outside the API-key check: the files hold no data and no secret, and the page asks the user for the
key and sends it with every API call. Each file is read once, when the server starts.

Every response carries a Content-Security-Policy that lets the page load and connect to its own
origin only (no inline script, no CDN), so the browser itself enforces that nothing leaves the machine.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI

PREFIX = "/ui/"

# 'self' only: scripts, styles, fetches and images come from this server; no inline script or style
# attribute, no plugins, no framing, no <base> rewrites, forms post nowhere else.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def _headers(content_type: str, length: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type.encode()), (b"content-length", str(length).encode()),
            (b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-cache")]


def static_files() -> dict[str, bytes]:
    """The page's files by name (``index.html``, ``chat.js``, ...), read from the installed package."""
    root = resources.files("ember.server") / "static"
    return {f.name: f.read_bytes() for f in root.iterdir()
            if f.is_file() and "." + f.name.rsplit(".", 1)[-1] in _TYPES}


class _ChatPage:
    """ASGI middleware: answers ``GET``/``HEAD`` of ``/`` and ``/ui/<file>``; passes everything else on."""

    def __init__(self, app, files: dict[str, bytes]) -> None:
        self.app = app
        self.files = files

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != "/" and not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        name = "index.html" if path == "/" else path[len(PREFIX):]
        body = self.files.get(name)
        if scope["method"] not in ("GET", "HEAD"):
            status, body, ctype = 405, b"method not allowed\n", "text/plain; charset=utf-8"
        elif body is None:
            status, body, ctype = 404, f"no file {path}\n".encode(), "text/plain; charset=utf-8"
        else:
            status, ctype = 200, _TYPES["." + name.rsplit(".", 1)[-1]]
        await send({"type": "http.response.start", "status": status, "headers": _headers(ctype, len(body))})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def mount_ui(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its files at ``/ui/`` on ``app``.

    Call it after the API-key middleware is added: middleware added later runs first, so the page
    loads without the key (the page then asks for it).
    """
    app.add_middleware(_ChatPage, files=static_files())
