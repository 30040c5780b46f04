"""Connections are reused (issues 11 and 15): one TCP (TLS in production) connection per host
serves many Slack calls and many gateway answers, against servers that keep connections open
(the werkzeug-based fakes close every connection, so these use http.server with HTTP/1.1)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

import ledger_bot as lb


class KeepAliveServer(http.server.ThreadingHTTPServer):
    """Counts the TCP connections it accepts; answers Slack-style JSON or an SSE stream."""

    daemon_threads = True

    def __init__(self) -> None:
        self.connections = 0
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: KeepAliveServer

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/chat/completions"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for data in ({"choices": [{"index": 0, "delta": {"content": "kept alive"}}]},
                         {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}):
                self._chunk(f"data: {json.dumps(data)}\n\n".encode())
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
            return
        body = json.dumps({"ok": True, "user_id": "U1", "bot_id": "B1", "team_id": "T1", "ts": "1.1"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = KeepAliveServer()
    yield srv
    srv.shutdown()
    srv.server_close()


def config_for(server: KeepAliveServer) -> lb.Config:
    return lb.load_config({"SLACK_BOT_TOKEN": "xoxb-1-2-3", "SLACK_APP_TOKEN": "xapp-1-2-3",
                           "LITELLM_DEVELOPER_KEY": "sk-keepalive-test", "LITELLM_BASE_URL": server.url + "/api/v2",
                           "SLACK_API_URL": server.url + "/api/"})


def test_slack_calls_from_one_thread_share_one_connection(server):
    config = config_for(server)
    web = lb.make_web_client(config.slack_bot_token, config.slack_api_url)
    for _ in range(5):
        web.api_call("auth.test")
    web.api_call("chat.postMessage", json={"channel": "C1", "text": "hello"})
    assert server.connections == 1


def test_gateway_answers_share_one_connection_through_the_shared_client(server):
    config = config_for(server)
    client = lb.make_llm_client(config)
    for _ in range(3):
        usage = lb.Usage()
        assert "".join(lb.stream_completion(config, [{"role": "user", "content": "hi"}], usage,
                                            client=client)) == "kept alive"
        assert usage.completion_tokens == 2
    assert server.connections == 1


def test_a_slack_call_that_times_out_waiting_for_the_answer_is_not_sent_twice():
    """Slack may have acted on it (a second chat.startStream would show the text twice)."""
    import socket
    import time

    from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler

    received = []
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            received.append(time.monotonic())  # read the request, never answer

    threading.Thread(target=serve, daemon=True).start()
    web = lb.PooledWebClient(token="xoxb-1", base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/api/",
                             timeout=0.5, retry_handlers=[ConnectionErrorRetryHandler(max_retry_count=2)])
    with pytest.raises(TimeoutError):
        web.api_call("chat.startStream", json={"channel": "C1", "markdown_text": "hi"})
    assert len(received) == 1
    listener.close()
