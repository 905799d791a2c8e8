#!/usr/bin/env python3
"""Tests for chatserve.py: unittest only, offline, loopback only.

Fake upstreams and servers are started by the tests themselves and always
stopped; every wait is bounded.  `python3 test_chatserve.py bench` runs the
benchmark (make bench); it is not part of the test suite.

Sections mirror chatserve.py: helpers, config, metrics, providers, engine,
OpenAI surface, HTTP server, control socket and ctl, command line, interop.
"""

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import chatserve as cs

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "chatserve.py")
WAIT = 10.0   # upper bound for any wait in a test


# ---------------------------------------------------------------------------
# Fake upstream: speaks the OpenAI wire format; the model name picks a scenario
# ---------------------------------------------------------------------------

def openai_chunk(delta=None, finish=None, usage=None, choices=True):
    chunk = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up-model"}
    chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    if usage:
        chunk["usage"] = usage
    return chunk


USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
TOOL_CALL_CHUNKS = [
    {"role": "assistant", "content": None,
     "tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": " \"Paris\"}"}}]},
    {"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
]


class FakeUpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def send_body(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.endswith("/models"):
            self.send_body(200, {"object": "list", "data": [{"id": "up-model", "object": "model", "owned_by": "fake"},
                                                            {"id": "org/other-model", "object": "model"}]})
        else:
            self.send_body(404, {"error": {"message": "no such path", "type": "invalid_request_error"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
        model = body.get("model", "")
        scenario = getattr(self, "scenario_" + model.replace("-", "_"), None)
        if scenario:
            return scenario(body)
        if body.get("stream"):
            return self.stream([openai_chunk({"role": "assistant", "content": ""}),
                                openai_chunk({"content": "Hello"}), openai_chunk({"content": " world"}),
                                openai_chunk(finish="stop"), openai_chunk(usage=USAGE, choices=False)])
        self.send_body(200, {"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"},
                                          "finish_reason": "stop"}], "usage": USAGE})

    def stream(self, chunks, done=True, delay=0.0, cut=False):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                data = ("data: %s\n\n" % json.dumps(chunk)).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                if delay:
                    time.sleep(delay)
            if cut:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if done:
                data = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            with self.server.lock:
                self.server.disconnects += 1
            self.close_connection = True

    # scenarios, chosen by the model name
    def scenario_tools(self, body):
        if body.get("stream"):
            return self.stream([openai_chunk(d) for d in TOOL_CALL_CHUNKS] + [openai_chunk(finish="tool_calls")])
        self.send_body(200, {"id": "x", "object": "chat.completion", "created": 1, "model": "tools", "choices": [
            {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}}],
            "usage": USAGE})

    def scenario_bad_request(self, body):
        self.send_body(400, {"error": {"message": "Invalid value for 'temperature'", "type": "invalid_request_error",
                                       "param": "temperature", "code": None}})

    def scenario_server_error(self, body):
        self.send_body(500, {"error": {"message": "The server had an error", "type": "server_error"}})

    def scenario_rate_limited(self, body):
        self.send_body(429, {"error": {"message": "Rate limit reached", "type": "requests"}}, [("Retry-After", "60")])

    def scenario_cut(self, body):
        self.stream([openai_chunk({"content": "partial"})], cut=True)

    def scenario_no_done(self, body):
        self.stream([openai_chunk({"content": "partial"})], done=False)

    def scenario_stream_error(self, body):
        self.stream([openai_chunk({"content": "a"}), {"error": {"message": "model overloaded", "type": "server_error"}}])

    def scenario_slow(self, body):
        time.sleep(self.server.slow_seconds)
        self.send_body(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "late"},
                                          "finish_reason": "stop"}]})

    def scenario_endless(self, body):
        self.stream([openai_chunk({"content": "tick "})] * self.server.endless_chunks, delay=0.02)

    def scenario_garbage(self, body):
        self.send_body(200, {"unexpected": True})


class FakeUpstream:
    """An OpenAI-compatible server on loopback; records what it was sent."""

    def __init__(self, handler=FakeUpstreamHandler):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None   # resets are part of the scenarios
        self.server.lock = threading.Lock()
        self.server.requests = []
        self.server.connections = 0
        self.server.disconnects = 0
        self.server.slow_seconds = 1.0
        self.server.endless_chunks = 400
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/v1" % self.server.server_address[1]

    @property
    def requests(self):
        return self.server.requests

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=WAIT, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# ---------------------------------------------------------------------------
# Shared fixtures: start chatserve in-process, talk HTTP to it
# ---------------------------------------------------------------------------

class ServerTestCase(unittest.TestCase):
    """Starts a fake upstream and chatserve per test; stops both."""

    upstream_handler = FakeUpstreamHandler

    def setUp(self):
        cs.setup_logging("error")
        self.tmp = tempfile.mkdtemp(prefix="chatserve-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.upstream = FakeUpstream(self.upstream_handler)
        self.addCleanup(self.upstream.stop)

    def start(self, env=None, **options):
        base_env = {"OPENAI_BASE_URL": self.upstream.url, "OPENAI_API_KEY": "sk-upstream-secret"}
        if env is not None:
            base_env = env
        self.started_apps = getattr(self, "started_apps", 0) + 1
        values = dict(port=0, metrics_port=0, socket=os.path.join(self.tmp, "ctl%d.sock" % self.started_apps),
                      drain_timeout=2.0, retry_backoff=0.001, probe_local=False)
        values.update(options)
        config = cs.Config(env=base_env, **values)
        config.validate()
        app = cs.App(config).start()
        self.addCleanup(app.stop)
        self.app = app
        return app

    def conn(self, app=None, timeout=WAIT):
        return http.client.HTTPConnection("127.0.0.1", (app or self.app).port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, app=None):
        """(status, headers, parsed JSON or text) over a fresh connection."""
        conn = self.conn(app)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json"}
            hdrs.update(headers or {})
            conn.request(method, path, data, hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode("utf-8", "replace")
            return resp.status, resp, parsed
        finally:
            conn.close()

    def chat(self, model="up-model", stream=False, **extra):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        body.update(extra)
        return body

    def assert_openai_error(self, status, body, expected_status, words=()):
        self.assertEqual(status, expected_status, body)
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"}, body)
        for word in words:
            self.assertIn(word, body["error"]["message"])


def sse_data(text):
    """The data payloads of an SSE body, JSON-decoded where they are JSON."""
    out = []
    for event, data in cs.iter_sse(line + b"\n" for line in text.encode().split(b"\n")):
        try:
            out.append(json.loads(data))
        except ValueError:
            out.append(data)
    return out



# A self-signed certificate for localhost/127.0.0.1, made for these tests only.
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBmzCCAUGgAwIBAgIUZBQ3wCiK7rOp7yf2pWYQA/fO/fEwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyMjE4NTA1MFoYDzIxMjYxMDI5
MTg1MDUwWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAT0Xv3NjKOblNP+QKXyWUV/PL0HJdAqFgNeghWKB20m3mv9E2G7Axe/
6Z1CIkWxpgAqvog0I2qnKU8lLsMI5u4Ho28wbTAdBgNVHQ4EFgQUi/lrt7wRhFTr
a4ZHf3WaR886xzYwHwYDVR0jBBgwFoAUi/lrt7wRhFTra4ZHf3WaR886xzYwDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDSAAwRQIhALGFxo7cqSombR2k2CLWWtB2Ac2o1YTrg015vUXyen+8AiBw
TGZLtGESwL1ja9D9rde/NqegDo0naLh2JQ0eAL6Djw==
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgHBwxvznwjSYJMv5z
Ij9BdiqNt0oU6si/J8n6rosUH3OhRANCAAT0Xv3NjKOblNP+QKXyWUV/PL0HJdAq
FgNeghWKB20m3mv9E2G7Axe/6Z1CIkWxpgAqvog0I2qnKU8lLsMI5u4H
-----END PRIVATE KEY-----
"""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

class HelpersTest(unittest.TestCase):
    def test_sse_frame_single_and_multiline(self):
        self.assertEqual(cs.sse_frame({"a": 1}), b'data: {"a":1}\n\n')
        self.assertEqual(cs.sse_frame("x\ny", event="e"), b"event: e\ndata: x\ndata: y\n\n")

    def test_iter_sse_parses_events_comments_and_multiline(self):
        lines = [b": keepalive\n", b"event: ping\n", b"data: {}\n", b"\n", b"data: a\n", b"data: b\r\n", b"\r\n",
                 b"data:[DONE]\n"]
        self.assertEqual(list(cs.iter_sse(lines)), [("ping", "{}"), (None, "a\nb"), (None, "[DONE]")])

    def test_parse_duration(self):
        self.assertEqual(cs.parse_duration("30"), 30.0)
        self.assertEqual(cs.parse_duration("500ms"), 0.5)
        self.assertEqual(cs.parse_duration("1h30m"), 5400.0)
        for bad in ("", "abc", "5 parsecs", "1h30"):
            with self.assertRaises(ValueError):
                cs.parse_duration(bad)

    def test_request_id_kept_when_safe_else_generated(self):
        self.assertEqual(cs.clean_request_id("abc-123"), "abc-123")
        self.assertTrue(cs.clean_request_id("bad id\r\nX: y").startswith("req-"))
        self.assertTrue(cs.clean_request_id(None).startswith("req-"))


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

class ConfigTest(unittest.TestCase):
    def test_flag_beats_environment_beats_default(self):
        self.assertEqual(cs.Config.from_sources({}, env={}).port, 50051)
        self.assertEqual(cs.Config.from_sources({}, env={"CHATCLI_SERVER_PORT": "8080"}).port, 8080)
        self.assertEqual(cs.Config.from_sources({"port": "9000"}, env={"CHATCLI_SERVER_PORT": "8080"}).port, 9000)
        c = cs.Config.from_sources({}, env={"CHATCLI_SERVER_TOKEN": "t", "CHATCLI_METRICS_PORT": "0"})
        self.assertEqual((c.token, c.metrics_port, c.drain_timeout), ("t", 0, 30.0))

    def test_host_default_is_loopback_but_all_interfaces_in_kubernetes(self):
        self.assertEqual(cs.Config.from_sources({}, env={}).host, "127.0.0.1")
        self.assertEqual(cs.Config.from_sources({}, env={"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).host, "0.0.0.0")
        self.assertEqual(cs.Config.from_sources({}, env={"CHATCLI_BIND_ADDRESS": "::1"}).host, "::1")

    def test_bad_values_name_their_source(self):
        cases = [({"port": "99999"}, {}, "--port"), ({}, {"CHATCLI_SERVER_PORT": "http"}, "CHATCLI_SERVER_PORT"),
                 ({"provider": "nope"}, {}, "unknown provider"), ({"tls_cert": "/nonexistent.pem"}, {}, "does not exist"),
                 ({"log_format": "xml"}, {}, "--log-format"), ({"drain_timeout": "soon"}, {}, "duration"),
                 ({"max_connections": "0"}, {}, "--max-connections")]
        for flags, env, words in cases:
            with self.assertRaises(cs.ConfigError) as ctx:
                cs.Config.from_sources(flags, env=env)
            self.assertIn(words, ctx.exception.message)

    def test_tls_needs_both_files_and_metrics_port_must_differ(self):
        with tempfile.NamedTemporaryFile() as f:
            with self.assertRaises(cs.ConfigError):
                cs.Config.from_sources({"tls_cert": f.name}, env={})
        with self.assertRaises(cs.ConfigError):
            cs.Config.from_sources({"port": "9090", "metrics_port": "9090"}, env={})

    def test_default_socket_path(self):
        self.assertTrue(cs.default_socket_path(1234).endswith("/chatserve-1234.sock"))


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

class MetricsTest(unittest.TestCase):
    def test_text_format_counters_histograms_and_escaping(self):
        c = cs.Counter("x_total", "Things.", ("a",))
        c.inc(('say "hi"\n',), 2)
        self.assertEqual(c.render(), ["# HELP x_total Things.", "# TYPE x_total counter",
                                      'x_total{a="say \\"hi\\"\\n"} 2'])
        h = cs.Histogram("d_seconds", "Durations.", ("m",), buckets=(0.1, 1))
        h.observe(("r",), 0.05)
        h.observe(("r",), 0.5)
        h.observe(("r",), 5)
        lines = h.render()
        self.assertIn('d_seconds_bucket{m="r",le="0.1"} 1', lines)
        self.assertIn('d_seconds_bucket{m="r",le="1"} 2', lines)
        self.assertIn('d_seconds_bucket{m="r",le="+Inf"} 3', lines)
        self.assertIn('d_seconds_count{m="r"} 3', lines)
        self.assertIn('d_seconds_sum{m="r"} 5.55', lines)

    def test_label_sets_are_capped(self):
        c = cs.Counter("y_total", "Y.", ("model",))
        for i in range(cs.MAX_SERIES + 50):
            c.inc(("m%d" % i,))
        self.assertEqual(len(c.series), cs.MAX_SERIES + 1)
        self.assertEqual(c.value(("other",)), 50)

    def test_registry_has_seed_names_and_process_metrics(self):
        text = cs.Metrics().render()
        for name in ("chatcli_grpc_requests_total", "chatcli_grpc_request_duration_seconds",
                     "chatcli_grpc_in_flight_requests", "chatcli_llm_requests_total",
                     "chatcli_llm_request_duration_seconds", "chatcli_llm_errors_total",
                     "chatcli_llm_tokens_used_total", "chatcli_server_uptime_seconds", "chatcli_server_info",
                     "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                     "process_threads"):
            self.assertIn("# TYPE %s " % name, text)


class MetricsEndpointTest(ServerTestCase):
    def test_metrics_count_requests_tokens_and_errors(self):
        app = self.start(metrics_port=free_port())
        self.request("POST", "/v1/chat/completions", self.chat())
        self.request("POST", "/v1/chat/completions", self.chat("bad-request"))
        self.request("GET", "/no/such/path")
        conn = http.client.HTTPConnection("127.0.0.1", app.metrics_port, timeout=WAIT)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        self.assertTrue(resp.getheader("Content-Type").startswith("text/plain; version=0.0.4"))
        self.assertIn('chatcli_grpc_requests_total{method="/v1/chat/completions",code="200"} 1', text)
        self.assertIn('chatcli_grpc_requests_total{method="unknown",code="404"} 1', text)
        self.assertIn('chatcli_llm_requests_total{provider="OPENAI",model="up-model",status="success"} 1', text)
        self.assertIn('chatcli_llm_tokens_used_total{provider="OPENAI",model="up-model",type="prompt"} 7', text)
        self.assertIn('chatcli_llm_tokens_used_total{provider="OPENAI",model="up-model",type="completion"} 5', text)
        self.assertIn('chatcli_llm_errors_total{provider="OPENAI",model="bad-request",error_type="invalid_request_error"} 1', text)
        self.assertIn('chatcli_server_info{version="%s",provider="OPENAI",model="gpt-4o-mini"} 1' % cs.__version__, text)
        self.assertNotIn("sk-upstream-secret", text)
        conn.request("GET", "/healthz")
        self.assertEqual(conn.getresponse().read(), b"ok\n")
        conn.close()


# ---------------------------------------------------------------------------
# Providers: the OpenAI provider and the pooled upstream client
# ---------------------------------------------------------------------------

class OpenAIProviderTest(ServerTestCase):
    def test_upstream_connections_are_pooled(self):
        self.start()
        for _ in range(5):
            status, _, body = self.request("POST", "/v1/chat/completions", self.chat())
            self.assertEqual(status, 200)
        self.request("POST", "/v1/chat/completions", self.chat(stream=True))
        self.request("POST", "/v1/chat/completions", self.chat(stream=True))
        self.assertEqual(self.upstream.server.connections, 1)

    def test_key_and_request_id_sent_upstream(self):
        self.start()
        self.request("POST", "/v1/chat/completions", self.chat(), headers={"X-Request-Id": "trace-1"})
        sent = self.upstream.requests[-1]
        self.assertEqual(sent["path"], "/v1/chat/completions")
        self.assertEqual(sent["headers"]["Authorization"], "Bearer sk-upstream-secret")
        self.assertEqual(sent["headers"]["X-Request-Id"], "trace-1")

    def test_stale_pooled_connection_is_retried_on_a_new_one(self):
        self.start()
        self.assertEqual(self.request("POST", "/v1/chat/completions", self.chat())[0], 200)
        # The upstream forgets its keep-alive connections (a restart, an idle timeout).
        pool = self.app.engine.pool
        for stack in pool.idle.values():
            for conn, _ in stack:
                conn.sock.shutdown(socket.SHUT_RDWR)
        self.assertEqual(self.request("POST", "/v1/chat/completions", self.chat())[0], 200)

    def test_dead_upstream_is_502_and_slow_one_is_504(self):
        self.start(env={"OPENAI_BASE_URL": "http://127.0.0.1:%d/v1" % free_port()})
        status, _, body = self.request("POST", "/v1/chat/completions", self.chat())
        self.assert_openai_error(status, body, 502, ["cannot connect"])
        self.upstream.server.slow_seconds = 1.0
        app = self.start(upstream_timeout=0.2)
        status, _, body = self.request("POST", "/v1/chat/completions", self.chat("slow"), app=app)
        self.assert_openai_error(status, body, 504, ["0.2"])

    def test_upstream_errors_map(self):
        self.start()
        status, resp, body = self.request("POST", "/v1/chat/completions", self.chat("bad-request"))
        self.assert_openai_error(status, body, 400, ["Invalid value for 'temperature'"])
        status, resp, body = self.request("POST", "/v1/chat/completions", self.chat("rate-limited"))
        self.assert_openai_error(status, body, 429, ["Rate limit reached"])
        self.assertEqual(resp.getheader("Retry-After"), "60")   # longer than chatserve waits: passed on
        status, _, body = self.request("POST", "/v1/chat/completions", self.chat("server-error"))
        self.assert_openai_error(status, body, 502, ["500", "The server had an error"])
        status, _, body = self.request("POST", "/v1/chat/completions", self.chat("garbage"))
        self.assert_openai_error(status, body, 502, ["cannot read"])

    def test_event_translation_of_whole_messages_and_chunks(self):
        events = cs.openai_message_events(
            {"content": "hi", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
            "tool_calls", {"prompt_tokens": 1, "completion_tokens": 2})
        self.assertEqual(events, [cs.TextDelta("hi"), cs.ToolCallDelta(0, "c", "f", "{}"), cs.Usage(1, 2),
                                  cs.Finish("tool_calls")])
        chunk = openai_chunk({"tool_calls": [{"index": 3, "function": {"arguments": "{\"a"}}]}, finish=None)
        self.assertEqual(list(cs.openai_chunk_events(chunk)), [cs.ToolCallDelta(3, None, None, "{\"a")])


# ---------------------------------------------------------------------------
# OpenAI surface
# ---------------------------------------------------------------------------

class OpenAISurfaceTest(ServerTestCase):
    def test_non_streamed_completion(self):
        self.start()
        status, _, body = self.request("POST", "/v1/chat/completions", self.chat())
        self.assertEqual(status, 200)
        self.assertEqual(body["object"], "chat.completion")
        self.assertTrue(body["id"].startswith("chatcmpl-"))
        self.assertEqual(body["model"], "up-model")
        self.assertEqual(body["choices"][0]["message"], {"role": "assistant", "content": "Hello world"})
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        self.assertEqual(body["usage"], USAGE)

    def test_streamed_completion_headers_chunks_and_done(self):
        self.start()
        status, resp, text = self.request("POST", "/v1/chat/completions", self.chat(stream=True))
        self.assertEqual(status, 200)
        self.assertTrue(resp.getheader("Content-Type").startswith("text/event-stream"))
        self.assertEqual(resp.getheader("Cache-Control"), "no-cache")
        self.assertEqual(resp.getheader("X-Accel-Buffering"), "no")
        chunks = sse_data(text)
        self.assertEqual(chunks[-1], "[DONE]")
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
        self.assertEqual(content, "Hello world")
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "stop")
        self.assertFalse(any("usage" in c for c in chunks[:-1]), "usage chunk only when asked")

    def test_include_usage_adds_a_usage_chunk_with_no_choices(self):
        self.start()
        _, _, text = self.request("POST", "/v1/chat/completions",
                                  self.chat(stream=True, stream_options={"include_usage": True}))
        chunks = sse_data(text)
        self.assertEqual(chunks[-2]["choices"], [])
        self.assertEqual(chunks[-2]["usage"], USAGE)
        self.assertEqual(chunks[-1], "[DONE]")

    def test_streamed_tool_calls_keep_their_index(self):
        self.start()
        _, _, text = self.request("POST", "/v1/chat/completions", self.chat("tools", stream=True))
        calls = {}
        for chunk in sse_data(text)[:-1]:
            for call in chunk["choices"][0]["delta"].get("tool_calls") or ():
                entry = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.get("id") or entry["id"]
                entry["name"] += call["function"].get("name", "")
                entry["arguments"] += call["function"].get("arguments", "")
        self.assertEqual(calls, {0: {"id": "call_a", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
                                 1: {"id": "call_b", "name": "get_time", "arguments": "{}"}})
        self.assertEqual(sse_data(text)[-2]["choices"][0]["finish_reason"], "tool_calls")

    def test_non_streamed_tool_calls(self):
        self.start()
        _, _, body = self.request("POST", "/v1/chat/completions", self.chat("tools"))
        message = body["choices"][0]["message"]
        self.assertIsNone(message["content"])
        self.assertEqual(message["tool_calls"][0]["function"], {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"})
        self.assertEqual(body["choices"][0]["finish_reason"], "tool_calls")

    def test_sampling_fields_tools_and_array_content_pass_through(self):
        self.start()
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        extra = dict(temperature=0.2, top_p=0.9, max_tokens=50, stop=["END"], seed=4, presence_penalty=0.5,
                     frequency_penalty=-0.5, tools=tools, tool_choice="auto", top_k=20, user="u1",
                     response_format={"type": "json_object"})
        body = self.chat(**extra)
        body["messages"] = [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                         {"type": "image_url", "image_url": {"url": "data:,"}}]}]
        self.assertEqual(self.request("POST", "/v1/chat/completions", body)[0], 200)
        sent = self.upstream.requests[-1]["body"]
        for key, value in extra.items():
            self.assertEqual(sent[key], value, key)
        self.assertEqual(sent["messages"], body["messages"])
        self.assertIs(sent["stream"], False)

    def test_default_model_used_when_request_has_none(self):
        self.start(env={"OPENAI_BASE_URL": self.upstream.url, "OPENAI_MODEL": "my-default"})
        body = self.chat()
        del body["model"]
        status, _, answer = self.request("POST", "/v1/chat/completions", body)
        self.assertEqual((status, answer["model"]), (200, "my-default"))
        self.assertEqual(self.upstream.requests[-1]["body"]["model"], "my-default")
        self.assertNotIn("Authorization", self.upstream.requests[-1]["headers"])

    def test_invalid_requests_are_400_naming_the_field(self):
        self.start()
        cases = [(b"{not json", None), (b"[]", None), (b"", None),
                 ({"messages": []}, "messages"), ({"model": "m"}, "messages"),
                 ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
                 ({"messages": [{"role": "user"}]}, "messages[0].content"),
                 ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
                 ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
                 (self.chat(temperature=3), "temperature"), (self.chat(temperature="hot"), "temperature"),
                 (self.chat(max_tokens=0), "max_tokens"), (self.chat(max_tokens=True), "max_tokens"),
                 (self.chat(n=2), "n"), (self.chat(stream="yes"), "stream"),
                 (self.chat(stop=["a", "b", "c", "d", "e"]), "stop"), (self.chat(tools=[{"type": "function"}]), "tools"),
                 (self.chat(tool_choice="sometimes"), "tool_choice"), (self.chat(model=""), "model")]
        for body, param in cases:
            status, _, answer = self.request("POST", "/v1/chat/completions", body)
            self.assert_openai_error(status, answer, 400)
            self.assertEqual(answer["error"]["param"], param, body)
            if param:
                self.assertIn(param.split("[")[0], answer["error"]["message"])
        self.assertEqual(self.upstream.requests, [])

    def test_stream_cut_midway_ends_with_error_chunk_and_done(self):
        self.start()
        for model, words in (("cut", "ended before"), ("no-done", "ended before"), ("stream-error", "model overloaded")):
            status, _, text = self.request("POST", "/v1/chat/completions", self.chat(model, stream=True))
            chunks = sse_data(text)
            self.assertEqual(status, 200)
            self.assertEqual(chunks[-1], "[DONE]")
            self.assertIn(words, chunks[-2]["error"]["message"], model)
            self.assertEqual(set(chunks[-2]["error"]), {"message", "type", "param", "code"})

    def test_client_disconnect_mid_stream_closes_upstream(self):
        self.start()
        conn = self.conn()
        conn.request("POST", "/v1/chat/completions", json.dumps(self.chat("endless", stream=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertTrue(any(b"tick" in resp.readline() for _ in range(10)))
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        self.assertTrue(wait_until(lambda: self.upstream.server.disconnects == 1, timeout=5))
        self.assertTrue(wait_until(lambda: self.app.in_flight == 0))

    def test_no_provider_configured_is_503_naming_the_variables(self):
        self.start(env={})
        status, _, body = self.request("POST", "/v1/chat/completions", self.chat())
        self.assert_openai_error(status, body, 503, ["OPENAI_API_KEY", "LLM_PROVIDER"])
        self.assertEqual(self.request("GET", "/health")[0], 200)

    def test_models_list_and_lookup(self):
        self.start(env={"OPENAI_BASE_URL": self.upstream.url, "OPENAI_MODEL": "conf-model"})
        status, _, body = self.request("GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual(body["object"], "list")
        ids = [m["id"] for m in body["data"]]
        self.assertEqual(ids, ["conf-model", "up-model", "org/other-model"])
        self.assertEqual(body["data"][0]["object"], "model")
        status, _, body = self.request("GET", "/v1/models/org/other-model")
        self.assertEqual((status, body["id"]), (200, "org/other-model"))
        status, _, body = self.request("GET", "/v1/models/nope")
        self.assert_openai_error(status, body, 404, ["nope"])
        self.assertEqual(body["error"]["code"], "model_not_found")


# ---------------------------------------------------------------------------
# HTTP server: auth, limits, keep-alive, TLS, logs
# ---------------------------------------------------------------------------

class AuthTest(ServerTestCase):
    def test_token_required_everywhere_but_health(self):
        self.start(token="s3cret")
        self.assertEqual(self.request("GET", "/health")[0], 200)
        for method, path, body in (("GET", "/status", None), ("GET", "/v1/models", None),
                                   ("POST", "/v1/chat/completions", self.chat())):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                status, resp, answer = self.request(method, path, body, headers)
                self.assert_openai_error(status, answer, 401, ["Bearer"])
                self.assertEqual(resp.getheader("WWW-Authenticate"), 'Bearer realm="chatserve"')
            status, _, _ = self.request(method, path, body, {"Authorization": "Bearer s3cret"})
            self.assertEqual(status, 200, path)
        self.assertEqual(len(self.upstream.requests), 1)


class HTTPServerTest(ServerTestCase):
    def test_unknown_route_404_and_wrong_method_405(self):
        self.start()
        status, _, body = self.request("GET", "/v2/nothing")
        self.assert_openai_error(status, body, 404, ["/v2/nothing"])
        status, resp, body = self.request("GET", "/v1/chat/completions")
        self.assert_openai_error(status, body, 405, ["POST"])
        self.assertEqual(resp.getheader("Allow"), "POST")

    def test_request_id_echoed_or_generated(self):
        self.start()
        _, resp, _ = self.request("GET", "/health", headers={"X-Request-Id": "abc.123"})
        self.assertEqual(resp.getheader("X-Request-Id"), "abc.123")
        _, resp, _ = self.request("GET", "/health")
        self.assertTrue(resp.getheader("X-Request-Id").startswith("req-"))

    def test_body_over_the_cap_is_413_and_never_read(self):
        self.start(max_body_bytes=1000)
        status, resp, body = self.request("POST", "/v1/chat/completions", b"x" * 2000)
        self.assert_openai_error(status, body, 413, ["--max-body-bytes"])
        self.assertEqual(resp.getheader("Connection"), "close")
        # Expect: 100-continue with a too large body is refused before the body is sent.
        with socket.create_connection(("127.0.0.1", self.app.port), timeout=WAIT) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                      b"Expect: 100-continue\r\n\r\n")
            self.assertTrue(s.recv(4096).startswith(b"HTTP/1.1 413"))
        self.assertEqual(self.upstream.requests, [])

    def test_chunked_request_body(self):
        self.start()
        data = json.dumps(self.chat()).encode()
        with socket.create_connection(("127.0.0.1", self.app.port), timeout=WAIT) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            reply = s.recv(65536)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:100])

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        self.start()
        conn = self.conn()
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", json.dumps(self.chat()), {"Content-Type": "application/json"})
            self.assertEqual(conn.getresponse().read() and 200, 200)
            conn.request("POST", "/v1/chat/completions", json.dumps(self.chat(stream=True)))
            resp = conn.getresponse()
            self.assertIn(b"[DONE]", resp.read())
        sock = conn.sock
        conn.close()
        self.assertIsNotNone(sock)
        self.assertTrue(wait_until(lambda: self.app.requests_processed == 6))

    def test_connections_beyond_the_cap_get_a_fast_503(self):
        self.start(max_connections=2)
        held = [socket.create_connection(("127.0.0.1", self.app.port), timeout=WAIT) for _ in range(2)]
        try:
            self.assertTrue(wait_until(lambda: self.app.http.tracker.count() == 2))
            status, resp, body = self.request("GET", "/health")
            self.assert_openai_error(status, body, 503, ["--max-connections"])
            self.assertEqual(resp.getheader("Retry-After"), "1")
        finally:
            for s in held:
                s.close()
        self.assertTrue(wait_until(lambda: self.app.http.tracker.count() == 0))
        self.assertEqual(self.request("GET", "/health")[0], 200)

    def test_idle_and_half_sent_requests_do_not_pin_threads(self):
        self.start(keepalive_timeout=0.2, request_timeout=0.2)
        idle = socket.create_connection(("127.0.0.1", self.app.port), timeout=WAIT)
        half = socket.create_connection(("127.0.0.1", self.app.port), timeout=WAIT)
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
        try:
            self.assertEqual(idle.recv(100), b"")     # closed by the server
            self.assertEqual(half.recv(100)[:0], b"")
            self.assertTrue(wait_until(lambda: self.app.http.tracker.count() == 0))
        finally:
            idle.close()
            half.close()

    def test_malformed_request_line_gets_a_json_400(self):
        self.start()
        with socket.create_connection(("127.0.0.1", self.app.port), timeout=WAIT) as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            reply = s.recv(65536)
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply)
        self.assertIn(b'"error"', reply)

    def test_tls_serves_https_with_tls12_minimum(self):
        cert, key = os.path.join(self.tmp, "c.pem"), os.path.join(self.tmp, "k.pem")
        with open(cert, "w") as f:
            f.write(TEST_CERT)
        with open(key, "w") as f:
            f.write(TEST_KEY)
        app = self.start(tls_cert=cert, tls_key=key, token="t")
        self.assertEqual(app.http.ssl_context.minimum_version, cs.ssl.TLSVersion.TLSv1_2)
        ctx = cs.ssl.create_default_context(cafile=cert)
        conn = http.client.HTTPSConnection("localhost", app.port, context=ctx, timeout=WAIT)
        conn.request("POST", "/v1/chat/completions", json.dumps(self.chat()),
                     {"Authorization": "Bearer t", "Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertEqual(json.loads(resp.read())["choices"][0]["message"]["content"], "Hello world")
        conn.close()
        plain = self.conn(app)
        with self.assertRaises((http.client.HTTPException, OSError)):
            plain.request("GET", "/health")
            plain.getresponse().read()
        plain.close()

    def test_one_access_log_line_per_request_in_json(self):
        stream = io.StringIO()
        self.start()
        cs.setup_logging("info", "json", stream)
        self.request("GET", "/health", headers={"X-Request-Id": "log-me"})
        self.request("POST", "/v1/chat/completions", self.chat())
        self.assertTrue(wait_until(lambda: stream.getvalue().count('"access"') == 2))
        cs.setup_logging("error")
        lines = [json.loads(l) for l in stream.getvalue().splitlines()]
        access = [l for l in lines if l.get("event") == "access"]
        self.assertEqual(len(access), 2)
        self.assertEqual((access[0]["path"], access[0]["status"], access[0]["request_id"]), ("/health", 200, "log-me"))
        self.assertEqual(access[1]["method"], "POST")
        self.assertNotIn("sk-upstream-secret", stream.getvalue())

    def test_status_route(self):
        self.start()
        status, _, body = self.request("GET", "/status")
        self.assertEqual(status, 200)
        for key in ("uptime_seconds", "requests_processed", "in_flight", "provider", "model", "version"):
            self.assertIn(key, body)
        self.assertEqual(body["provider"], "OPENAI")
        self.assertNotIn("sk-upstream-secret", json.dumps(body))


# ---------------------------------------------------------------------------
# Control socket, graceful shutdown, ctl
# ---------------------------------------------------------------------------

class ControlSocketTest(ServerTestCase):
    def test_socket_is_0600_and_answers_status(self):
        app = self.start()
        path = app.config.socket_path
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        status, body = cs.control_request(path, "GET", "/status")
        self.assertEqual(status, 200)
        for key in ("status", "server_type", "uptime_seconds", "requests_processed", "in_flight", "pid", "host",
                    "port", "control_socket", "provider", "model", "version"):
            self.assertIn(key, body)
        self.assertEqual((body["pid"], body["port"], body["control_socket"]), (os.getpid(), app.port, path))

    def test_live_socket_is_never_taken_and_stale_one_is_replaced(self):
        app = self.start()
        with self.assertRaises(cs.ConfigError) as ctx:
            self.start(socket=app.config.socket_path)
        self.assertIn("another chatserve", ctx.exception.message)
        stale = os.path.join(self.tmp, "stale.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(stale)
        s.close()                                  # a socket file nobody answers on
        app2 = self.start(socket=stale)
        self.assertEqual(cs.control_request(stale, "GET", "/status")[0], 200)
        regular = os.path.join(self.tmp, "regular")
        open(regular, "w").close()
        with self.assertRaises(cs.ConfigError):
            self.start(socket=regular)

    def test_shutdown_drains_in_flight_stream_then_removes_socket(self):
        app = self.start(drain_timeout=5.0)
        self.upstream.server.endless_chunks = 30      # a stream that ends within the drain timeout
        path = app.config.socket_path
        conn = self.conn()
        conn.request("POST", "/v1/chat/completions", json.dumps(self.chat("endless", stream=True)))
        resp = conn.getresponse()
        resp.readline()
        status, body = cs.control_request(path, "POST", "/shutdown")
        self.assertEqual((status, body["status"]), (200, "shutting_down"))
        self.assertTrue(app.stopping.wait(WAIT))
        stopper = threading.Thread(target=app.stop)
        stopper.start()
        self.assertTrue(wait_until(lambda: app.http.tracker.draining))
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", app.port), timeout=1).close()
        rest = resp.read()                      # the in-flight stream runs to its end
        self.assertTrue(rest.rstrip().endswith(b"data: [DONE]"), rest[-200:])
        stopper.join(WAIT)
        self.assertFalse(stopper.is_alive())
        self.assertFalse(os.path.exists(path))

    def test_drain_timeout_cuts_streams_that_run_too_long(self):
        app = self.start(drain_timeout=0.2)
        conn = self.conn()
        conn.request("POST", "/v1/chat/completions", json.dumps(self.chat("endless", stream=True)))
        resp = conn.getresponse()
        resp.readline()
        started = time.monotonic()
        app.stop()
        self.assertLess(time.monotonic() - started, WAIT)
        self.assertTrue(wait_until(lambda: self.upstream.server.disconnects == 1))


def serve_process(test, *args, env=None):
    """Start `chatserve.py serve` as a subprocess; returns (proc, port, socket path)."""
    port = free_port()
    sock = os.path.join(test.tmp, "p%d.sock" % port)
    full_env = dict(os.environ, OPENAI_BASE_URL=test.upstream.url, OPENAI_API_KEY="sk-x", **(env or {}))
    proc = subprocess.Popen([sys.executable, SCRIPT, "serve", "--port", str(port), "--metrics-port", "0",
                             "--socket", sock] + list(args), env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def cleanup():
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()
    test.addCleanup(cleanup)
    if not wait_until(lambda: os.path.exists(sock) or proc.poll() is not None):
        test.fail("chatserve did not start")
    return proc, port, sock


def run_cli(*args, env=None, timeout=WAIT):
    return subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


class CtlTest(ServerTestCase):
    def test_ctl_status_json_and_shutdown(self):
        proc, port, sock = serve_process(self)
        out = run_cli("ctl", "status", "--socket", sock)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertRegex(out.stdout, r"(?m)^status\s+running$")
        self.assertRegex(out.stdout, r"(?m)^port\s+%d$" % port)
        out = run_cli("ctl", "status", "--socket", sock, "--json")
        self.assertEqual(json.loads(out.stdout)["pid"], proc.pid)
        out = run_cli("ctl", "shutdown", "--socket", sock)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("shutting down", out.stdout)
        self.assertEqual(proc.wait(WAIT), 0)
        self.assertFalse(os.path.exists(sock))

    def test_ctl_without_a_server_exits_1(self):
        out = run_cli("ctl", "status", "--socket", os.path.join(self.tmp, "none.sock"))
        self.assertEqual(out.returncode, 1)
        self.assertIn("no running chatserve found at", out.stderr)
        out = run_cli("ctl", "status", "--port", str(free_port()))
        self.assertEqual(out.returncode, 1)
        self.assertIn("no running chatserve found at", out.stderr)

    def test_sigterm_and_sigint_shut_down_gracefully(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc, port, sock = serve_process(self)
            proc.send_signal(sig)
            self.assertEqual(proc.wait(WAIT), 0)
            self.assertFalse(os.path.exists(sock))
            self.assertIn(b"stopped", proc.stderr.read())


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

class CommandLineTest(unittest.TestCase):
    def test_bad_values_exit_2_with_one_line(self):
        for args in (["serve", "--port", "99999"], ["serve", "--provider", "NOPE"],
                     ["serve", "--tls-cert", "/nonexistent", "--tls-key", "/nonexistent"],
                     ["serve", "--log-level", "loud"], ["frobnicate"], ["serve", "--no-such-flag"]):
            out = run_cli(*args, env={"CHATCLI_METRICS_PORT": "0"})
            self.assertEqual(out.returncode, 2, args)
            self.assertEqual(len(out.stderr.strip().splitlines()), 1, out.stderr)
            self.assertNotIn("Traceback", out.stderr)
        out = run_cli("serve", env={"CHATCLI_SERVER_PORT": "70000"})
        self.assertIn("CHATCLI_SERVER_PORT", out.stderr)

    def test_help_on_every_subcommand_and_version(self):
        for args in ([], ["serve"], ["ctl"], ["version"]):
            out = run_cli(*(args + ["--help"]))
            self.assertEqual(out.returncode, 0, args)
            self.assertIn("usage:", out.stdout)
        out = run_cli("serve", "--help")
        for flag in ("--host", "--port", "--token", "--tls-cert", "--tls-key", "--provider", "--model",
                     "--metrics-port", "--socket", "--max-connections", "--max-body-bytes", "--drain-timeout",
                     "--log-level", "--log-format", "CHATCLI_SERVER_PORT"):
            self.assertIn(flag, out.stdout)
        self.assertIn(cs.__version__, run_cli("version").stdout)

    def test_port_in_use_exits_2(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            out = run_cli("serve", "--port", str(s.getsockname()[1]), "--metrics-port", "0")
        self.assertEqual(out.returncode, 2)
        self.assertIn("cannot listen on 127.0.0.1:", out.stderr)



# ---------------------------------------------------------------------------
# Interop: the official SDKs against chatserve (make interop)
# ---------------------------------------------------------------------------

try:
    import openai
except ImportError:
    openai = None

INTEROP_REQUIRED = os.environ.get("CHATSERVE_INTEROP") == "1"


class InteropTest(ServerTestCase):
    """Under `make interop` a missing SDK fails; elsewhere it skips."""

    def setUp(self):
        if openai is None:
            if INTEROP_REQUIRED:
                self.fail("the openai package is not importable; make interop installs it in .venv-interop")
            self.skipTest("openai SDK not installed (make interop runs these)")
        super().setUp()
        self.start(token="tok")
        self.client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.app.port, api_key="tok",
                                    max_retries=0, timeout=WAIT)

    def test_non_streamed_chat(self):
        answer = self.client.chat.completions.create(model="up-model", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(answer.choices[0].message.content, "Hello world")
        self.assertEqual(answer.usage.total_tokens, 12)

    def test_streamed_chat_with_include_usage(self):
        stream = self.client.chat.completions.create(model="up-model", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "Hello world")
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, 5)

    def test_streamed_tool_calls(self):
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        stream = self.client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "hi"}],
                                                     tools=tools, stream=True)
        args = {}
        for chunk in stream:
            for call in chunk.choices[0].delta.tool_calls or ():
                args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
        self.assertEqual(json.loads(args[0]), {"city": "Paris"})
        self.assertEqual(args[1], "{}")
        self.assertEqual(self.upstream.requests[-1]["body"]["tools"], tools)

    def test_non_streamed_tool_calls(self):
        answer = self.client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(answer.choices[0].message.tool_calls[0].function.name, "get_weather")

    def test_wrong_token_is_authentication_error(self):
        bad = openai.OpenAI(base_url=self.client.base_url, api_key="wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            bad.chat.completions.create(model="up-model", messages=[{"role": "user", "content": "hi"}])

    def test_invalid_request_is_bad_request_error(self):
        with self.assertRaises(openai.BadRequestError) as ctx:
            self.client.chat.completions.create(model="up-model", messages=[{"role": "wizard", "content": "hi"}])
        self.assertIn("messages[0].role", str(ctx.exception))

    def test_error_mid_stream_raises(self):
        stream = self.client.chat.completions.create(model="stream-error", stream=True,
                                                     messages=[{"role": "user", "content": "hi"}])
        with self.assertRaises(openai.APIError) as ctx:
            list(stream)
        self.assertIn("model overloaded", str(ctx.exception))

    def test_models(self):
        ids = [m.id for m in self.client.models.list()]
        self.assertIn("up-model", ids)
        self.assertEqual(self.client.models.retrieve("org/other-model").id, "org/other-model")


if __name__ == "__main__":
    unittest.main()
