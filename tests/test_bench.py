"""The benchmark's smoke test, and end-to-end tests of what the performance work added to the
Openqq server: check_event long-polls parked without a thread (plugins/openqq.py, Parker)."""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, wait_until

LISTEN = [{"host": "127.0.0.1", "port": 0}]


class Conn(object):
    """A raw keep-alive HTTP/1.1 connection: send request bytes, read whole answers."""

    def __init__(self, url, rcvbuf=None):
        host, port = url.split("//")[1].split(":")
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(15)
        self.sock.connect((host, int(port)))
        self.file = self.sock.makefile("rb")

    def send(self, *paths):
        self.sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % p.encode() for p in paths))

    def answer(self):
        """(status, headers, body) of the next answer."""
        status = self.file.readline()
        assert status, "connection closed without an answer"
        headers = {}
        while True:
            line = self.file.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status.split()[1]), headers, self.file.read(int(headers["content-length"]))

    def json(self):
        """(status, body decoded as JSON) of the next answer."""
        status, _, body = self.answer()
        return status, json.loads(body.decode("utf-8"))

    def close(self):
        self.file.close()
        self.sock.close()


@pytest.mark.slow
def test_quick_benchmark_runs_every_item_and_prints_the_table():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=110, cwd=ROOT)
    out = done.stdout.decode("utf-8")
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")[-3000:]
    for heading in ("1. login", "2. RSS of the client process", "3. info routes", "4. send_friend_message",
                    "5. message latency", "6. 200 check_event long-pollers", "7. ", "8. 200 event streams",
                    "9. 20 event streams", "10. durable delivery", "targets"):
        assert heading in out, out
    for row in ("get_friend_info        1", "get_group_info        32", "sync, 32 clients", "async, 32 clients",
                "beyond the upstream: -> post_api", "pollers answered with the event",
                "deliveries lost 0, twice 0; streams cut 0", "(300 messages x 20 streams): lost 0, twice 0",
                "store = memory: injected -> post_api", "store = sqlite: injected -> post_api", "the store's write",
                "lost 0): after 5000 reports", "post_api p99 with the store <= 2x without"):
        assert row in out, out
    assert re.search(r"store = sqlite +[\d.]+ +[\d.]+ +lost 0", out), out
    assert "errors (" not in out, out        # figures are free, but every answer must have been a 200


def test_long_pollers_wait_without_threads_then_all_get_the_event_and_keep_their_connection(sim, running):
    plugin = running.load("openqq", listen=LISTEN, check_event_timeout=30)
    server = plugin.servers[0]
    seq = plugin.hub.seq
    conns = [Conn(plugin.urls[0]) for _ in range(100)]
    for conn in conns:
        conn.send("/openqq/check_event?cursor=%d" % seq)
    assert wait_until(lambda: len(server.parker) == 100)
    connection_thread = "openqq-conn-%d" % server.port    # the client's own threads come and go meanwhile
    assert wait_until(lambda: not [t for t in threading.enumerate() if t.name == connection_thread])
    sim.inject_friend_message(sim.world.friends[0].uin, "to all of you")
    for conn in conns:
        status, headers, body = conn.answer()
        events = json.loads(body.decode("utf-8"))
        assert status == 200 and headers["x-cursor"] == str(plugin.hub.seq) and plugin.hub.seq > seq
        assert [(e["content"], e["cursor"]) for e in events] == [("to all of you", plugin.hub.seq)]
    for conn in conns:                      # the same connections serve the next requests
        conn.send("/openqq/get_user_info")
        status, user = conn.json()
        assert status == 200 and user["id"] == running.user.id
        conn.close()


def test_a_request_behind_a_waiting_long_poll_ends_the_wait_and_is_answered_next(sim, running):
    plugin = running.load("openqq", listen=LISTEN, check_event_timeout=30)
    conn = Conn(plugin.urls[0])
    conn.send("/openqq/check_event")
    assert wait_until(lambda: len(plugin.servers[0].parker) == 1)
    started = time.time()
    conn.send("/openqq/get_user_info")
    assert conn.answer()[::2] == (200, b"[]")
    assert time.time() - started < 5       # not the 30 s of check_event_timeout
    status, user = conn.json()
    assert status == 200 and user["id"] == running.user.id
    conn.close()


@pytest.mark.slow
def test_a_request_sent_together_with_a_long_poll_is_answered_after_it(sim, running):
    plugin = running.load("openqq", listen=LISTEN, check_event_timeout=1)
    conn = Conn(plugin.urls[0])
    conn.send("/openqq/check_event", "/openqq/get_user_info")
    assert conn.answer()[::2] == (200, b"[]")
    status, user = conn.json()
    assert status == 200 and user["id"] == running.user.id
    conn.close()


def test_a_parked_answer_larger_than_the_socket_buffers_arrives_whole(sim, running):
    plugin = running.load("openqq", listen=LISTEN, check_event_timeout=30)
    conn = Conn(plugin.urls[0], rcvbuf=4096)
    conn.send("/openqq/check_event")
    assert wait_until(lambda: len(plugin.servers[0].parker) == 1)
    big = "长" * 2000000                      # 6 MB of UTF-8: more than a socket's send buffer takes at once
    sim.inject_friend_message(sim.world.friends[0].uin, big)
    assert wait_until(lambda: plugin.hub.seq > 0)
    time.sleep(0.3)                         # the rest is being written by a thread while we don't read
    status, events = conn.json()
    assert status == 200 and [e["content"] for e in events] == [big]
    conn.send("/openqq/check_event")        # the connection goes on
    assert wait_until(lambda: len(plugin.servers[0].parker) == 1)
    conn.close()


def test_parked_pollers_count_against_max_connections(sim, running):
    plugin = running.load("openqq", listen=LISTEN, check_event_timeout=30, max_connections=3)
    conns = [Conn(plugin.urls[0]) for _ in range(3)]
    for conn in conns:
        conn.send("/openqq/check_event")
    assert wait_until(lambda: len(plugin.servers[0].parker) == 3)
    extra = Conn(plugin.urls[0])
    extra.send("/openqq/get_user_info")
    assert extra.json() == (503, {"code": -9, "status": "too many connections"})
    for conn in conns + [extra]:
        conn.close()


def test_stopping_answers_the_parked_pollers_at_once(sim, running):
    plugin = running.load("openqq", listen=LISTEN, check_event_timeout=30)
    conns = [Conn(plugin.urls[0]) for _ in range(5)]
    for conn in conns:
        conn.send("/openqq/check_event")
    assert wait_until(lambda: len(plugin.servers[0].parker) == 5)
    started = time.time()
    plugin.stop()
    assert time.time() - started < 5
    for conn in conns:
        assert conn.answer()[::2] == (200, b"[]")
        assert conn.file.read() == b""      # then closed
        conn.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("openqq-park")]
