"""`magiclens serve`: an index and its checkpoint behind a small HTTP server, loaded once.

  GET  /             a page with a form: a query image, an instruction, k
  POST /search       the form's target: a page with the query and the hits as thumbnails
  POST /api/search   the same search for programs: multipart/form-data (image, instruction, k), or JSON
                     {"image": BASE64, "instruction": TEXT, "k": N}; answers JSON {"query", "index_size", "results"}

Bound to 127.0.0.1 unless --host says otherwise: the server has no authentication.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import email.parser
import email.policy
import html
import json
import logging
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOG = logging.getLogger("magiclens.serve")
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 100
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'self'"


class BadRequest(ValueError):
    """A request the server cannot answer; the message is sent back to the client."""


def form_page(index_size: int) -> str:
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>MagicLens search</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} label {{ display: block; margin: .6em 0; }}</style></head>
<body>
<h1>MagicLens search</h1>
<p>{index_size} images in the index. Give a query image and what to find relative to it.</p>
<form method="post" action="/search" enctype="multipart/form-data">
<label>Query image <input type="file" name="image" accept="image/*" required></label>
<label>Instruction <input type="text" name="instruction" size="60" placeholder="e.g. the same building at night"></label>
<label>Results <input type="number" name="k" value="10" min="1" max="{MAX_K}"></label>
<button type="submit">Search</button>
</form>
</body>
</html>
"""


def parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """A multipart/form-data body -> {field name: raw bytes}."""
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("send multipart/form-data (an image file and an instruction) or JSON")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    if not message.is_multipart():
        raise BadRequest("the multipart body does not parse")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = part.get_payload(decode=True) or b""
    return fields


def query_from_request(content_type: str, body: bytes) -> tuple[bytes, str, int]:
    """(image bytes, instruction, k) of a form post or a JSON request; BadRequest says what is missing."""
    if content_type.startswith("application/json"):
        try:
            data = json.loads(body)
            image = base64.b64decode(data["image"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise BadRequest('JSON requests are {"image": BASE64, "instruction": TEXT, "k": N}') from None
        instruction, k = data.get("instruction", ""), data.get("k", 10)
    else:
        fields = parse_multipart(content_type, body)
        image = fields.get("image", b"")
        instruction = fields.get("instruction", b"").decode("utf-8", "replace")
        k = fields.get("k", b"10").decode("ascii", "replace").strip() or "10"
    if not image:
        raise BadRequest("no query image: send it as the field 'image'")
    if not isinstance(instruction, str):
        raise BadRequest("the instruction must be text")
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise BadRequest(f"k must be a whole number, got {k!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be between 1 and {MAX_K}, got {k}")
    return image, instruction.strip(), k


def make_handler(searcher: Any) -> type[BaseHTTPRequestHandler]:
    """A request handler searching `searcher` (a model.search.Searcher), one search at a time."""
    from magiclens.model.index import SearchIndexError
    from magiclens.model.search import render_html

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "magiclens-serve"

        def _send(self, status: int, body: str, content_type: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, as_json: bool) -> None:
            if as_json:
                self._send(status, json.dumps({"error": message}), "application/json")
            else:
                page = f'<!doctype html><meta charset="utf-8"><p>{html.escape(message)}</p><p><a href="/">Back</a></p>'
                self._send(status, page, "text/html")

        def do_GET(self) -> None:  # noqa: N802 - the http.server interface
            if self.path.split("?", 1)[0] != "/":
                self._error(HTTPStatus.NOT_FOUND, "not found: the search page is at /", as_json=False)
                return
            self._send(HTTPStatus.OK, form_page(searcher.index.size), "text/html")

        def do_POST(self) -> None:  # noqa: N802
            as_json = self.path == "/api/search"
            if self.path not in ("/search", "/api/search"):
                self._error(HTTPStatus.NOT_FOUND, "POST to /search (the form) or /api/search (JSON)", as_json)
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 < length <= MAX_UPLOAD_BYTES:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > 0 else HTTPStatus.LENGTH_REQUIRED,
                            f"send a body with a Content-Length of at most {MAX_UPLOAD_BYTES} bytes", as_json)
                return
            body = self.rfile.read(length)
            try:
                image, instruction, k = query_from_request(self.headers.get("Content-Type", ""), body)
                with lock:
                    hits = searcher.search(image, instruction, k)
            except (BadRequest, SearchIndexError) as error:
                self._error(HTTPStatus.BAD_REQUEST, str(error), as_json)
                return
            if as_json:
                answer = {"query": {"instruction": instruction}, "index_size": searcher.index.size,
                          "results": [hit.to_dict() for hit in hits]}
                self._send(HTTPStatus.OK, json.dumps(answer), "application/json")
            else:
                page = render_html(image, instruction, hits, searcher.index)
                page = page.replace("<body>", '<body>\n<p><a href="/">New search</a></p>', 1)
                self._send(HTTPStatus.OK, page, "text/html")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            LOG.info("%s %s", self.address_string(), format % args)

    return Handler


def make_server(searcher: Any, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server (not yet serving) for `searcher`; port 0 takes any free port (see server.server_address)."""
    server = ThreadingHTTPServer((host, port), make_handler(searcher))
    server.daemon_threads = True
    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="an index folder written by `magiclens index`")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint that built the index")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; the server has no authentication, so only give another "
                             "address (e.g. 0.0.0.0) on a network you trust")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--faiss", action="store_true", help="search the faiss index that `magiclens index --faiss` built")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from magiclens.model.checkpoint import CheckpointError
    from magiclens.model.index import SearchIndexError
    from magiclens.model.search import Searcher

    if not 0 <= args.port <= 65535:
        raise SystemExit(f"--port must be between 0 and 65535, got {args.port}")
    try:
        searcher = Searcher.open(args.index, args.checkpoint, args.device, faiss_params="" if args.faiss else None)
    except (SearchIndexError, CheckpointError) as error:
        print(f"magiclens serve: {error}", file=sys.stderr)
        return 2
    try:
        server = make_server(searcher, args.host, args.port)
    except OSError as error:
        print(f"magiclens serve: cannot listen on {args.host}:{args.port}: {error.strerror or error}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"serving {args.index} ({searcher.index.size} images) on http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
