"""An OpenAI-compatible HTTP front end to the serving loop (the standard library's server).

* ``POST /v1/completions``: ``prompt`` (text, or a list of token ids), ``max_tokens``
  (default 16), ``stream`` (server-sent events, ending ``data: [DONE]``), and
  ``stream_options.include_usage``. Decoding is greedy, so ``temperature`` must be 0 (or
  left out) and ``n`` 1; an output has exactly ``max_tokens`` tokens (these models have no
  end-of-sequence: ``ignore_eos`` is accepted and changes nothing).
* ``POST /tokenize`` (``prompt`` -> ``tokens``) and ``POST /detokenize`` (``tokens`` ->
  ``prompt``), as vLLM's server has them: clients check their tokenizer against the server's.
* ``GET /v1/models``, ``GET /health`` (503 once the loop has stopped), ``GET /metrics``.

A client that disconnects, mid-stream or while its request waits, is noticed within
``POLL_S`` and its request aborted: its KV blocks are freed. Errors are OpenAI's shape,
``{"error": {"message", "type", "code"}}``, with 400 for bad input.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine_adapter.errors import RequestError
from engine_adapter.serving import ServingLoop, StreamEnd, TokenStream
from engine_adapter.text_codec import ByteCodec, HFCodec

POLL_S = 0.05  # how often a handler waiting for tokens looks whether its client is gone
MAX_BODY = 16 << 20


class BadRequest(ValueError):
    """A request body the API refuses (400), with what to change."""


class _ClientGone(Exception):
    pass


def parse_completion(body: bytes, codec: ByteCodec | HFCodec, model: str) -> dict:
    """The checked fields of a ``/v1/completions`` body: prompt (token ids), max_tokens,
    stream, include_usage."""
    doc = _object(body)
    if doc.get("model") not in (None, model):
        raise BadRequest(f"model {doc['model']!r} is not served here; this server serves "
                         f"{model!r}")
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # (a batch of one)
    if isinstance(prompt, str):
        ids = codec.encode(prompt)
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        ids = prompt
    else:
        raise BadRequest("prompt must be a string or a list of token ids (one prompt per "
                         "request)")
    max_tokens = doc.get("max_tokens")
    max_tokens = 16 if max_tokens is None else max_tokens
    if type(max_tokens) is not int or max_tokens < 1:
        raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}")
    temperature = doc.get("temperature", 0)
    if not isinstance(temperature, (int, float)) or temperature not in (0, 0.0):
        raise BadRequest(f"decoding here is greedy: temperature must be 0, got {temperature!r}")
    if doc.get("n", 1) != 1 or doc.get("best_of", 1) != 1:
        raise BadRequest("n and best_of must be 1")
    for key, unset in (("stop", (None, [], "")), ("logprobs", (None, 0)), ("echo", (False,)),
                       ("suffix", (None, ""))):
        if doc.get(key, unset[0]) not in unset:  # (not done here: refused, not ignored)
            raise BadRequest(f"{key} is not supported here (outputs have exactly max_tokens "
                             "greedy tokens)")
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {stream!r}")
    options = doc.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object")
    return {"prompt": ids, "max_tokens": max_tokens, "stream": stream,
            "include_usage": bool(options.get("include_usage", False))}


def _object(body: bytes) -> dict:
    """A request body's JSON object."""
    try:
        doc = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    return doc


class CompletionServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, the serving loop behind them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], loop: ServingLoop,
                 codec: ByteCodec | HFCodec, model: str) -> None:
        self.loop, self.codec, self.model = loop, codec, model
        self.created = int(time.time())
        super().__init__(address, _Handler)

    def serve_in_thread(self) -> None:
        threading.Thread(target=self.serve_forever, name="lpenv-http", daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    server: CompletionServer
    server_version = "lpenv-serve"
    # Seconds a read or write may block: a client that stops reading its stream is dropped
    # (and its request aborted) rather than holding a thread for good.
    timeout = 120

    def log_message(self, format: str, *args) -> None:  # (quiet; /metrics says the rest)
        pass

    # ---- replies ------------------------------------------------------------------------
    def _json(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    # ---- routes -------------------------------------------------------------------------
    def do_GET(self) -> None:
        srv = self.server
        if self.path == "/health":
            if srv.loop.healthy:
                self._json(200, {"status": "ok"})
            else:
                self._error(503, f"the serving loop stopped: {srv.loop.error}", "server_error")
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": srv.model, "object": "model", "created": srv.created,
                 "owned_by": "lpenv"}]})
        elif self.path == "/metrics":
            body = srv.loop.exposition().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        route = {"/v1/completions": self._complete, "/tokenize": self._tokenize,
                 "/detokenize": self._detokenize}.get(self.path)
        if route is None:
            self._error(404, f"no route POST {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._error(400, "Content-Length must be a byte count")
            return
        if length > MAX_BODY:
            self._error(413, f"the body is over {MAX_BODY} bytes")
            return
        try:
            route(self.rfile.read(length))
        except BadRequest as exc:
            self._error(400, str(exc))

    def _tokenize(self, body: bytes) -> None:
        prompt = _object(body).get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        ids = self.server.codec.encode(prompt)
        self._json(200, {"tokens": ids, "count": len(ids),
                         "max_model_len": self.server.loop.engine.max_model_len})

    def _detokenize(self, body: bytes) -> None:
        tokens = _object(body).get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
            raise BadRequest("tokens must be a list of token ids")
        decoder = self.server.codec.decoder()
        self._json(200, {"prompt": "".join(decoder.push(t) for t in tokens) + decoder.flush()})

    def _complete(self, body: bytes) -> None:
        srv = self.server
        try:
            req = parse_completion(body, srv.codec, srv.model)
            stream = srv.loop.submit(req["prompt"], req["max_tokens"])
        except (BadRequest, RequestError) as exc:
            self._error(400, str(exc))
            return
        except RuntimeError as exc:  # the loop stopped
            self._error(503, str(exc), "server_error")
            return
        self._completion_id = f"cmpl-{uuid.uuid4().hex}"  # (one request per connection)
        try:
            if req["stream"]:
                self._stream(stream, req["include_usage"])
            else:
                self._whole(stream)
        except (_ClientGone, BrokenPipeError, ConnectionResetError):
            srv.loop.abort(stream.request_id)
        except BaseException:
            srv.loop.abort(stream.request_id)  # (nobody will read the rest of it)
            raise

    def _chunk_doc(self, stream: TokenStream, text: str, finish: str | None) -> dict:
        return {"id": self._completion_id, "object": "text_completion",
                "created": self.server.created, "model": self.server.model,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    def _items(self, stream: TokenStream) -> Iterator[int | StreamEnd]:
        """The stream's tokens, then its end; raises _ClientGone if the client left."""
        checked = time.monotonic()
        while True:
            item = stream.get(POLL_S)
            # (looked at every POLL_S, tokens or not: a request without a stream writes
            # nothing until its end)
            if time.monotonic() - checked >= POLL_S:
                if self._client_gone():
                    raise _ClientGone
                checked = time.monotonic()
            if item is None:
                continue
            yield item
            if isinstance(item, StreamEnd):
                return

    def _client_gone(self) -> bool:
        """Whether the client closed its end: readable (``poll``, which has no limit on file
        descriptors, unlike ``select``) with end of file to read. (Not ``recv`` with
        ``MSG_DONTWAIT``: on a socket with a timeout Python first waits that long.)"""
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            if not poller.poll(0):
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _whole(self, stream: TokenStream) -> None:
        decoder = self.server.codec.decoder()
        text, n, end = [], 0, StreamEnd("abort")
        for item in self._items(stream):
            if isinstance(item, StreamEnd):
                end = item
            else:
                text.append(decoder.push(item))
                n += 1
        if end.reason != "length":
            self._error(500 if end.reason == "error" else 503,
                        end.message or "the server stopped before the request finished",
                        "server_error")
            return
        doc = self._chunk_doc(stream, "".join(text) + decoder.flush(), "length")
        doc["usage"] = _usage(stream, n)
        self._json(200, doc)

    def _stream(self, stream: TokenStream, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        decoder, n = self.server.codec.decoder(), 0
        for item in self._items(stream):
            if isinstance(item, StreamEnd):
                if item.reason != "length":  # (headers are sent: the error goes in the stream)
                    self._event({"error": {"message": item.message or "the server stopped",
                                           "type": "server_error", "code": 500}})
                break
            n += 1
            # One chunk a token, the last with its finish reason (as OpenAI's and vLLM's
            # servers send it: a client counts chunks as tokens).
            last = n == stream.max_tokens
            text = decoder.push(item) + (decoder.flush() if last else "")
            self._event(self._chunk_doc(stream, text, "length" if last else None))
        if include_usage:
            doc = self._chunk_doc(stream, "", None)
            doc["choices"] = []
            doc["usage"] = _usage(stream, n)
            self._event(doc)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, doc: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(doc).encode() + b"\n\n")
        self.wfile.flush()


def _usage(stream: TokenStream, generated: int) -> dict:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": generated,
            "total_tokens": stream.prompt_tokens + generated}
