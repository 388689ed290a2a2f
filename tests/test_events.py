"""GET /openqq/events (Server-Sent Events) over real sockets: the bytes of each event, the cursor as
its id, resuming by Last-Event-ID or ?cursor=, the reset, the type filter (check_event's too), the
rules every route follows, and streams held without a thread (the Parker) or, on TLS, on one."""
import json
import logging
import socket
import ssl
import threading
import time

import pytest
import requests

import webqq
from conftest import LogLines, free_port, log_in, scan_and_confirm, wait_until
from webqq_plugins import openqq

TOKEN = "ev-t0ken"


class Sse(object):
    """A raw HTTP/1.1 client of the stream: the head as it came, then one event block at a time."""

    def __init__(self, url, path="/openqq/events", headers=None, rcvbuf=None, context=None):
        host, port = url.split("//")[1].rsplit(":", 1)
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect((host, int(port)))
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname=host)
        lines = ["GET %s HTTP/1.1" % path, "Host: %s:%s" % (host, port)]
        lines += ["%s: %s" % pair for pair in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.data = b""
        self.head = self.until(b"\r\n\r\n")

    def until(self, mark):
        """The bytes up to and with mark, reading as needed; b"" if the connection ended first."""
        while mark not in self.data:
            chunk = self.sock.recv(65536)
            if not chunk:
                return b""
            self.data += chunk
        part, _, self.data = self.data.partition(mark)
        return part + mark

    def block(self):
        """The next block (an event or a comment) with its final blank line."""
        return self.until(b"\n\n")

    def event(self):
        """The next event as {field: value} (data parsed as JSON); comments are skipped."""
        while True:
            block = self.block()
            assert block, "the stream ended"
            if not block.startswith(b":"):
                break
        fields = dict(line.split(": ", 1) for line in block.decode("utf-8").strip("\n").split("\n"))
        fields["data"] = json.loads(fields["data"])
        return fields

    def rest(self):
        """Everything until the server closes the connection."""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return self.data
            self.data += chunk

    def close(self):
        self.sock.close()


def block_of(cursor, item, event=None):
    """The exact bytes of one event as the stream writes it."""
    head = b"event: %s\n" % event.encode() if event else b""
    return head + b"id: %d\ndata: %s\n\n" % (cursor, webqq.json_dumps(item).encode("utf-8"))


def check_event(url, **params):
    r = requests.get(url + "/openqq/check_event", params=dict(params, access_token=TOKEN), timeout=10)
    return r


@pytest.fixture
def env(sim, make_client):
    """A client logged in to the simulator, serving Openqq with a token; .url, .plugin, .sim."""
    client = make_client()
    client.plugin_ = client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}], access_token=TOKEN,
                                 check_event_timeout=5, stop_delay=0.2)
    client.url = client.plugin_.urls[0]
    client.sim = sim
    return client


def events_path(**params):
    query = "&".join("%s=%s" % pair for pair in dict(params, access_token=TOKEN).items())
    return "/openqq/events?" + query


# -- the stream --------------------------------------------------------------------------------

def test_each_event_is_what_check_event_gives_with_its_cursor_as_id(sim, env):
    log_in(sim, env)
    friend, group = sim.world.friends[0], sim.world.groups[0]
    sim.inject_friend_message(friend.uin, "before the stream")
    env.recorder.wait("receive_message")
    before = int(check_event(env.url, cursor=0).headers["X-Cursor"])
    assert before >= 1

    stream = Sse(env.url, events_path())
    assert stream.head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    headers = dict(line.split(b": ", 1) for line in stream.head.strip().split(b"\r\n")[1:])
    assert headers[b"Content-Type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"Cache-Control"] == b"no-store" and headers[b"Connection"] == b"close"
    assert b"Content-Length" not in headers and headers[b"X-Content-Type-Options"] == b"nosniff"
    # no cursor: the stream begins now, and says where
    assert stream.block() == b'retry: 2000\nevent: ready\nid: %d\ndata: {"cursor":%d}\n\n' % (before, before)

    sim.inject_friend_message(friend.uin, "第一条 live")
    member = [m for m in group.members if m.uin != sim.world.user.uin][0]
    sim.inject_group_message(group.gid, member.uin, "second [微笑]")
    first, second = stream.block(), stream.block()
    items = check_event(env.url, cursor=before).json()
    assert [i["content"] for i in items] == ["第一条 live", "second [微笑]"]
    assert first == block_of(before + 1, items[0]) and second == block_of(before + 2, items[1])
    assert items[0]["cursor"] == before + 1 and items[0]["post_type"] == "receive_message"

    # our own send through the API comes too, with its final status
    sent = requests.get(env.url + "/openqq/send_friend_message",
                        params={"id": friend.uin, "content": "from a script", "access_token": TOKEN}, timeout=10).json()
    event = stream.event()
    assert event["id"] == str(before + 3) and event["data"]["id"] == sent["id"]
    assert (event["data"]["class"], event["data"]["code"], event["data"]["msg"]) == ("send", 0, "发送成功")
    stream.close()


def test_resume_by_last_event_id_or_cursor_loses_and_repeats_nothing(sim, env):
    log_in(sim, env)
    friend = sim.world.friends[1]
    for n in range(4):
        sim.inject_friend_message(friend.uin, "m%d" % n)
    env.recorder.wait("receive_message", count=4)
    items = check_event(env.url, cursor=0).json()
    assert [i["content"] for i in items] == ["m0", "m1", "m2", "m3"]

    by_cursor = Sse(env.url, events_path(cursor=items[1]["cursor"]))
    assert by_cursor.block() == (b'retry: 2000\nevent: ready\nid: %d\ndata: {"cursor":%d}\n\n'
                                 % (items[1]["cursor"], items[1]["cursor"]))
    assert by_cursor.block() + by_cursor.block() == block_of(items[2]["cursor"], items[2]) + \
        block_of(items[3]["cursor"], items[3])
    by_cursor.close()
    # an EventSource comes back with the URL it first opened and the id it last got: the header wins
    resumed = Sse(env.url, events_path(cursor=0), headers={"Last-Event-ID": str(items[2]["cursor"])})
    assert resumed.event()["event"] == "ready"
    assert resumed.block() == block_of(items[3]["cursor"], items[3])
    sim.inject_friend_message(friend.uin, "m4")
    assert resumed.event()["data"]["content"] == "m4"
    resumed.close()

    for bad in ("cursor=-1", "cursor=x"):
        r = requests.get(env.url + "/openqq/events?access_token=%s&%s" % (TOKEN, bad), timeout=5)
        assert (r.status_code, r.json()) == (400, {"code": -9, "status": "cursor must be a number >= 0"})
    r = requests.get(env.url + events_path(), headers={"Last-Event-ID": "abc"}, timeout=5)
    assert (r.status_code, r.json()) == (400, {"code": -9, "status": "Last-Event-ID must be a number >= 0"})


def test_a_cursor_out_of_the_history_gets_a_reset_then_what_is_kept(sim, make_client):
    client = make_client()
    plugin = client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}], access_token=TOKEN,
                         check_event_list_max_size=2, check_event_history_size=3)
    url = plugin.urls[0]
    log_in(sim, client)
    friend = sim.world.friends[2]
    for n in range(5):
        sim.inject_friend_message(friend.uin, "h%d" % n)
    client.recorder.wait("receive_message", count=5)

    def kept():
        return requests.get(url + "/openqq/check_event", params={"cursor": 0, "access_token": TOKEN}, timeout=5).json()
    # the recorder hears of a message before the plugin has numbered it: wait for the last one in the history
    assert wait_until(lambda: [i["content"] for i in kept()] == ["h2", "h3", "h4"])
    items = kept()
    first = items[0]["cursor"] - 2      # the run's first number (the time in ms), then one by one
    assert [i["cursor"] for i in items] == [first + 2, first + 3, first + 4]     # the first two fell out

    stream = Sse(url, events_path(cursor=first))
    assert stream.event()["event"] == "ready"
    assert stream.block() == b'event: reset\nid: %d\ndata: {"asked":%d,"cursor":%d}\n\n' % (first + 1, first, first + 1)
    assert [stream.event()["data"]["content"] for _ in range(3)] == ["h2", "h3", "h4"]
    stream.close()
    # a cursor ahead of every number (made up, or from a clock set back) starts over, with a reset too
    ahead = Sse(url, events_path(cursor=10 ** 15))
    assert ahead.event() == {"retry": "2000", "event": "ready", "id": str(10 ** 15), "data": {"cursor": 10 ** 15}}
    assert ahead.block() == b'event: reset\nid: %d\ndata: {"asked":%d,"cursor":%d}\n\n' % (first + 1, 10 ** 15, first + 1)
    assert ahead.event()["id"] == str(first + 2)
    ahead.close()
    # a cursor still in the history: no reset
    kept = Sse(url, events_path(cursor=first + 2))
    kept.event()
    assert kept.event()["id"] == str(first + 3)
    kept.close()


def test_the_type_filter_of_the_stream_and_of_check_event(sim, env):
    log_in(sim, env)
    friend, group = sim.world.friends[0], sim.world.groups[1]
    member = [m for m in group.members if m.uin != sim.world.user.uin][0]
    sim.inject_friend_message(friend.uin, "the run's first number")       # the numbers go one by one from it
    env.recorder.wait("receive_message", count=1)
    assert check_event(env.url, cursor=0).json()     # the plugin has numbered it too (it hears of it after us)
    stream = Sse(env.url, events_path(type="group_message"))
    start = int(stream.event()["id"])
    sim.inject_friend_message(friend.uin, "not for the filter")
    sim.inject_group_message(group.gid, member.uin, "群消息")
    env.recorder.wait("receive_message", count=3)
    event = stream.event()
    assert event["data"]["content"] == "群消息" and event["id"] == str(start + 2)
    stream.close()

    r = check_event(env.url, cursor=start, type="group_message,new_friend")
    assert [i["content"] for i in r.json()] == ["群消息"] and r.headers["X-Cursor"] == str(start + 2)
    r = check_event(env.url, cursor=start, type="receive_message")
    assert [i["content"] for i in r.json()] == ["not for the filter", "群消息"]
    # nothing matching yet: the poll waits (parked) for a match, not for the next event
    server = env.plugin_.servers[0]
    assert wait_until(lambda: len(server.parker) == 0)
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.update(r=check_event(env.url, cursor=start + 2,
                                                                          type="discuss_message")))
    thread.start()
    assert wait_until(lambda: len(server.parker) == 1)
    sim.inject_friend_message(friend.uin, "still not")
    env.recorder.wait("receive_message", count=4)
    thread.join(0.5)                    # time enough for the parker to answer, were it to answer now
    assert thread.is_alive()
    discuss = sim.world.discusses[0]
    sim.inject_discuss_message(discuss.did, [m for m in discuss.members if m.uin != sim.world.user.uin][0].uin, "讨论")
    thread.join(10)
    assert [i["content"] for i in waiting["r"].json()] == ["讨论"] and waiting["r"].headers["X-Cursor"] == str(start + 4)

    r = check_event(env.url, type="group_message")
    assert (r.status_code, r.json()) == (400, {"code": -9, "status": "type filters the cursor mode only: add "
                                                                     "cursor=0 (or the cursor you have)"})
    for bad in ("", "Group!", ","):
        r = requests.get(env.url + "/openqq/events", params={"type": bad, "access_token": TOKEN}, timeout=5)
        assert r.status_code == 400 and r.json()["status"].startswith("type must be event names")


# -- the rules of every route --------------------------------------------------------------------

def test_the_stream_follows_the_rules_of_every_route(sim, env):
    lines = LogLines()
    try:
        r = requests.get(env.url + events_path(), timeout=5)           # before the login
        assert (r.status_code, r.json()) == (503, {"code": -7, "status": "client not running", "state": "init"})
        assert r.headers["Retry-After"] == "3"
        log_in(sim, env)
        r = requests.get(env.url + "/openqq/events", timeout=5)
        assert (r.status_code, r.json()) == (403, {"code": -6, "status": "auth failure"})
        r = requests.get(env.url + "/openqq/events?access_token=wrong", timeout=5)
        assert (r.status_code, r.json()) == (403, {"code": -6, "status": "auth failure"})
        r = requests.get(env.url + events_path(), headers={"Origin": "http://evil.example"}, timeout=5)
        assert (r.status_code, r.json()) == (403, {"code": -6, "status": "cross-site request refused"})
        r = requests.post(env.url + events_path(), timeout=5)
        assert (r.status_code, r.json()) == (403, {"code": -8, "status": "api not found"})
        # the token as a header, and JSONP asked for: still the stream, never wrapped
        stream = Sse(env.url, "/openqq/events?datatype=jsonp&callback=f", headers={"Authorization": "Bearer " + TOKEN})
        assert b"text/event-stream" in stream.head and stream.event()["event"] == "ready"
        stream.close()
        stream = Sse(env.url, events_path(), headers={"Origin": env.url, "Sec-Fetch-Site": "same-origin"})
        assert stream.event()["event"] == "ready"
        stream.close()
        r = requests.head(env.url + events_path(), timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert wait_until(lambda: any("/openqq/events" in line for line in lines.lines))
    finally:
        lines.close()
    logged = "\n".join(lines.lines)
    assert TOKEN not in logged and "access_token=***" in logged


def test_streams_wait_without_a_thread_and_get_keep_alives(sim, env, monkeypatch):
    monkeypatch.setattr(openqq.EventStream, "keep_alive", 0.3)
    log_in(sim, env)
    server = env.plugin_.servers[0]
    streams = [Sse(env.url, events_path()) for _ in range(20)]
    for stream in streams:
        stream.event()
    assert wait_until(lambda: len(server.parker) == 20)
    assert wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("openqq-conn-")])
    assert all(stream.block() == b": keep-alive\n\n" for stream in streams)
    sim.inject_friend_message(sim.world.friends[3].uin, "to every stream")
    assert all(stream.event()["data"]["content"] == "to every stream" for stream in streams)
    streams[0].close()                                       # a client that leaves is let go
    assert wait_until(lambda: len(server.parker) == 19)
    env.stop()                                               # the stop ends every stream
    for stream in streams[1:]:
        stream.rest()


def test_a_stream_that_falls_too_far_behind_is_cut_and_resumes_without_loss(sim, env):
    log_in(sim, env)
    server = env.plugin_.servers[0]
    server.stream_backlog = 20000
    lines = LogLines(logging.INFO)
    slow = Sse(env.url, events_path(), rcvbuf=4096)
    start = int(slow.event()["id"])
    assert wait_until(lambda: len(server.parker) == 1)
    body = "x" * 50000
    try:
        for n in range(200):                   # far more than the socket buffers (4 MB at most here) and the backlog
            env.plugin_.hub.put({"post_type": "event", "event": "bulk", "params": [n, body]})
            if len(server.parker) == 0:
                break
        assert wait_until(lambda: len(server.parker) == 0)
        assert wait_until(lambda: any("stream to 127.0.0.1 cut" in line for line in lines.lines))
    finally:
        lines.close()
    got = []
    for block in slow.rest().split(b"\n\n")[:-1]:      # the last may be cut in the middle: a browser drops it
        if block.startswith(b"id: "):
            got.append(int(block.split(b"\n")[0][4:]))
    assert got == list(range(start + 1, start + 1 + len(got)))
    resumed = Sse(env.url, events_path(), headers={"Last-Event-ID": str(got[-1] if got else start)})
    assert resumed.event()["event"] == "ready"
    assert resumed.event()["id"] == str((got[-1] if got else start) + 1)
    resumed.close()


def test_a_tls_stream_is_served_on_its_connection_thread(sim, make_client, self_signed):
    client = make_client()
    plugin = client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0, "tls_cert": self_signed,
                                            "tls_key": self_signed}], access_token=TOKEN)
    log_in(sim, client)
    context = ssl.create_default_context(cafile=self_signed)
    stream = Sse(plugin.urls[0], events_path(), context=context)
    assert stream.event()["event"] == "ready"
    sim.inject_friend_message(sim.world.friends[0].uin, "over TLS")
    assert stream.event()["data"]["content"] == "over TLS"
    started = time.time()
    client.stop()                                      # the thread waiting in the stream ends with the plugin
    assert time.time() - started < 5
    stream.close()


# -- as people start it ----------------------------------------------------------------------------

def test_the_stream_and_the_console_of_python_webqq_py(sim, tmp_path, launch):
    port = free_port()
    config = tmp_path / "webqq.ini"
    config.write_text("[webqq]\nsmartqq_base = %s\ntmpdir = %s\nqr_check_interval = 0.05\nsend_interval = 0\n"
                      "qrcode_display = console\nlog_level = debug\n\n[openqq]\nlisten = 127.0.0.1:%d\n"
                      "access_token = %s\n\n[console]\nhistory = 2\n" % (sim.url, tmp_path, port, TOKEN),
                      encoding="utf-8")
    program = launch("-c", config)
    url = "http://127.0.0.1:%d" % port
    program.wait_log(r"openqq listening")
    r = requests.get(url + events_path(), timeout=5)
    assert (r.status_code, r.json()["code"], r.json()["status"]) == (503, -7, "client not running")
    scan_and_confirm(sim)
    program.wait_log(r"\(running\)")
    stream = Sse(url, events_path(type="receive_message"))
    assert stream.event()["event"] == "ready"
    friend = sim.world.friends[0]
    for n in range(3):
        sim.inject_friend_message(friend.uin, "to the subprocess %d" % n)
    got = [stream.event() for _ in range(3)]
    assert [e["data"]["content"] for e in got] == ["to the subprocess %d" % n for n in range(3)]
    assert [int(e["id"]) for e in got] == [int(got[0]["id"]) + n for n in range(3)]
    history = requests.get(url + "/console/history", params={"conversation": "friend:%d" % friend.uin,
                                                             "access_token": TOKEN}, timeout=5).json()
    assert history["messages"] == [{k: v for k, v in e["data"].items() if k != "cursor"} for e in got[1:]]
    page = requests.get(url + "/console/", headers={"Authorization": "Bearer " + TOKEN}, timeout=5)
    assert page.status_code == 200 and "text/event-stream" not in page.headers["Content-Type"]
    assert program.stop() == 0
    assert stream.rest() is not None                          # the stop ended the stream
    log = program.log()
    assert "/openqq/events?type=receive_message&access_token=*** HTTP/1.1\" 200" in log and TOKEN not in log
