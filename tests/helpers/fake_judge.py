"""A local OpenAI-compatible chat endpoint for the judge tests (eval/judge.py `OpenAIJudge`)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


class ChatHandler(BaseHTTPRequestHandler):
    """Answers each POSTed chat-completions request with `reply(body)` as its one choice."""

    def reply(self, body: dict[str, Any]) -> str:
        raise NotImplementedError

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        data = json.dumps({"choices": [{"message": {"content": self.reply(body)}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve(handler_cls: type[BaseHTTPRequestHandler]) -> tuple[HTTPServer, str]:
    """Serve `handler_cls` on a free local port in a daemon thread; the server and its /v1 URL."""
    server = HTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
