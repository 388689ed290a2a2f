#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""bench: figures for webqq against the simulator, every party on loopback in a process of its own.

    python scripts/bench.py                  # the full benchmark (about 7 minutes on 2 cores)
    python scripts/bench.py --quick          # a small version of each item, in under a minute
    python scripts/bench.py --json out.json  # also write every raw figure

Processes, so that no two parties share an interpreter lock: the simulator with a generated
world; the webqq client under test (Client and the openqq plugin, as `python webqq.py` runs
them); the ceiling, a bare ThreadingHTTPServer (HTTP/1.1) answering with the very bytes webqq
answered; the load generator, keep-alive connections driven by one selector loop; and a
post_api receiver with a check_event reader. The parent starts each with `--child ROLE` and
talks to it over its standard input and output, one JSON line per command and per answer.
Times that cross processes are wall-clock times of the one machine.

The table (median of --runs runs; latencies as p50/p99):

 1. login: the confirmed QR scan -> state `running` (members then load in the background)
 2. RSS of the client process: idle before login, once every group member is loaded, and
    after the info routes of item 3 were served
 3. get_friend_info / get_group_info at 1, 8 and 32 keep-alive clients, beside the ceiling;
    within a run the two take turns (on connections kept open), so that both meet the same
    background load; webqq/ceiling is the median of the runs' ratios
 4. send_friend_message at send_interval 0: sync, and async (answered, then delivered upstream)
 5. message latency over --messages messages at --rate/s: injected at the simulator -> post_api
    receiver and -> check_event answer, in total and beyond the simulator's own delivery
    (the moment its poll2 answer was ready)
 6. --pollers check_event long-pollers (cursor mode, so each of them gets the event) held
    --hold seconds, then one event: how long until all have it; RSS and threads meanwhile
 7. --quick: a small world and short runs
 8. --streams event streams (GET /openqq/events) held open, then --stream-events messages one at a
    time: how long after webqq accepted each one every stream has it; RSS and threads meanwhile
 9. --load-streams streams while --stream-rate messages a second come in for --stream-seconds:
    none lost, none twice, and the latency from acceptance to each stream
10. durable delivery: message -> post_api latency with `store = memory` and with the store (a
    client of each, one after the other, as in item 5); with each, --sustained seconds at
    --sustained-rate messages/s; then, with the store, batches at --bulk-rate (each delivered
    before the next) until --reports reports in all: latency, CPU, the store's write time per
    report, RSS and the store's size on disk

then the issue's targets with the figure that decides each. Figures, not pass/fail: the exit
status is 0 whatever the numbers are. RSS and thread counts come from /proc (Linux only).
"""

import argparse
import array
import datetime
import json
import math
import os
import platform
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FULL = {"friends": 2000, "groups": 200, "members": 200, "runs": 3, "seconds": 3.0, "sends": 1000,
        "messages": 1000, "rate": 100.0, "pollers": 1000, "hold": 30.0, "streams": 1000, "stream_events": 20,
        "load_streams": 100, "stream_rate": 100.0, "stream_seconds": 60.0, "sustained": 60.0,
        "sustained_rate": 500.0, "bulk_rate": 1000.0, "reports": 100000}
QUICK = {"friends": 200, "groups": 20, "members": 50, "runs": 1, "seconds": 0.5, "sends": 200,
         "messages": 100, "rate": 100.0, "pollers": 200, "hold": 2.0, "streams": 200, "stream_events": 5,
         "load_streams": 20, "stream_rate": 100.0, "stream_seconds": 3.0, "sustained": 4.0,
         "sustained_rate": 500.0, "bulk_rate": 1000.0, "reports": 5000}
CLIENTS = (1, 8, 32)
BULK_BATCH = 5000       # messages of item 10's bulk phase delivered before the next ones are injected
INFO_ROUTES = ("get_friend_info", "get_group_info")
QR_CHECK_INTERVAL = 0.1


class BenchError(Exception):
    """A part of the benchmark could not run (a process died, a wait timed out)."""


###############################################################################
# 1. Helpers
###############################################################################


def percentile(values, p):
    """The p-th quantile (0..1) of values by nearest rank; None for no values."""
    values = sorted(values)
    if not values:
        return None
    return values[max(0, math.ceil(p * len(values)) - 1)]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def proc_status(pid):
    """{"rss", "peak" (kB), "threads"} of a process from /proc; {} where there is no /proc."""
    fields = {"VmRSS:": "rss", "VmHWM:": "peak", "Threads:": "threads"}
    try:
        with open("/proc/%d/status" % pid) as f:
            return {fields[line.split()[0]]: int(line.split()[1]) for line in f
                    if line.split() and line.split()[0] in fields}
    except OSError:
        return {}


def cpu_seconds(pid):
    """User + system CPU seconds a process has used, from /proc; None where there is none."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def wait_until(predicate, timeout, interval=0.02):
    """Call predicate until it returns something true or timeout passes; its last result."""
    deadline = time.time() + timeout
    while True:
        result = predicate()
        if result or time.time() >= deadline:
            return result
        time.sleep(interval)


def progress(text):
    sys.stderr.write("bench: %s\n" % text)
    sys.stderr.flush()


###############################################################################
# 2. Child processes
###############################################################################


class Child(object):
    """A bench process started with --child ROLE: one JSON line per command, one per answer."""

    def __init__(self, role, log_path, **options):
        self.role = role
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", role, json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT)
        self.pid = self.proc.pid
        self.lock = threading.Lock()

    def call(self, cmd, **args):
        """Run cmd in the child; its result, or BenchError."""
        with self.lock:
            try:
                self.proc.stdin.write((json.dumps({"cmd": cmd, "args": args}) + "\n").encode("utf-8"))
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except OSError:
                line = b""
        if not line:
            raise BenchError("the %s process ended during %s (its log: %s)" % (self.role, cmd, self.log_path))
        answer = json.loads(line.decode("utf-8"))
        if "error" in answer:
            raise BenchError("%s %s: %s (its log: %s)" % (self.role, cmd, answer["error"], self.log_path))
        return answer["result"]

    def close(self, timeout=30):
        """Close its input (the child stops its parts and exits); kill it if it does not."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


def serve_child(role, options):
    """The child's side: build the part for role, then answer commands until standard input ends."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                       # anything printed goes to the log, not into the answers
    part = ROLES[role](**options)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                answer = {"result": getattr(part, "do_" + request["cmd"])(**request["args"])}
            except Exception as e:
                traceback.print_exc()
                answer = {"error": "%s: %s" % (type(e).__name__, e)}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
    finally:
        part.stop()
    return 0


###############################################################################
# 3. Parts: simulator, client, ceiling, receiver
###############################################################################


class SimPart(object):
    """The simulator with a generated world; notes when each message is injected and delivered."""

    def __init__(self, friends, groups, members, poll_hold):
        sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]
        from smartqq_sim import Simulator
        self.sim = Simulator(world={"friends": friends, "groups": groups, "members": members,
                                    "discusses": 1, "seed": 1}, poll_hold=poll_hold)
        self.injected, self.delivered = {}, {}
        self.poll2 = self.sim._poll2
        self.sim._poll2 = self.timed_poll2      # respond() looks routes up on the instance
        self.injector = None
        self.stopping = threading.Event()
        self.sim.start()

    def timed_poll2(self, req):
        resp = self.poll2(req)
        if resp.status == 200 and b'"poll_type"' in resp.body:
            now = time.time()
            for event in json.loads(resp.body.decode("utf-8")).get("result") or ():
                self.delivered.setdefault((event.get("value") or {}).get("msg_id"), now)
        return resp

    def do_url(self):
        return self.sim.url

    def do_login(self, timeout):
        """Scan and confirm the QR the client shows; the time of the confirmation."""
        if not self.sim.wait_qr("waiting", timeout):
            raise BenchError("no QR code was fetched within %s s" % timeout)
        self.sim.scan()
        confirmed = time.time()
        self.sim.confirm()
        return confirmed

    def inject(self, n):
        """Message n: from a friend when n is even, in a group when it is odd; (id, injection time)."""
        world, content = self.sim.world, "bench %d" % n
        started = time.time()
        if n % 2 == 0:
            msg_id = self.sim.inject_friend_message(world.friends[(n // 2) % len(world.friends)], content)
        else:
            group = world.groups[(n // 2) % len(world.groups)]
            others = world.others(group)
            msg_id = self.sim.inject_group_message(group, others[(n // 2) % len(others)], content)
        self.injected[msg_id] = started
        return msg_id, started

    def do_inject_one(self):
        return self.inject(0)

    def do_inject(self, count, rate):
        """Start injecting count messages at rate per second on a thread; returns at once."""
        def run():
            start = time.time()
            for n in range(count):
                if self.stopping.wait(max(0.0, start + n / rate - time.time())):
                    return
                self.inject(n)
        self.injector = threading.Thread(target=run, name="bench-inject")
        self.injector.start()

    def do_timings(self, ids):
        """[injected, delivered] times of each message id (None when not delivered yet)."""
        if self.injector is not None:
            self.injector.join()
        return [[self.injected.get(i), self.delivered.get(i)] for i in ids]

    def do_injected_ids(self):
        if self.injector is not None:
            self.injector.join()
        return sorted(self.injected)

    def do_forget(self):
        self.injected.clear()
        self.delivered.clear()

    def do_wait_sent(self, count, timeout):
        """The time when the simulator has received count sends in all, or None after timeout."""
        return wait_until(lambda: len(self.sim.sent) >= count and time.time(), timeout, 0.005) or None

    def do_sent_count(self):
        return len(self.sim.sent)

    def stop(self):
        self.stopping.set()
        if self.injector is not None:
            self.injector.join()
        self.sim.stop()


class WebqqPart(object):
    """The client under test: webqq.Client with the openqq plugin; notes when each state began."""

    def __init__(self, sim_url, tmpdir, openqq):
        sys.path.insert(0, ROOT)
        import webqq
        self.client = webqq.Client(smartqq_base=sim_url, tmpdir=tmpdir, send_interval=0, qrcode_display="none",
                                   qr_check_interval=QR_CHECK_INTERVAL, log_level="warn")
        self.states = {}
        self.client.on("state_change", lambda old, new: self.states.setdefault(new, time.time()))
        self.accepted = {}          # message id -> when the client emitted it, just before the plugin queues it
        self.client.on("receive_message", lambda msg: self.accepted.setdefault(msg.id, time.time()))
        self.plugin = self.client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}], **openqq)
        if self.plugin is None:
            raise BenchError("the openqq plugin did not load")
        self.add_times = array.array("d")       # seconds each store write took, on the emitting thread
        add = self.plugin.store.add

        def timed_add(*args, **kwargs):
            started = time.perf_counter()
            try:
                return add(*args, **kwargs)
            finally:
                self.add_times.append(time.perf_counter() - started)
        self.plugin.store.add = timed_add
        self.client.start()

    def do_url(self):
        return self.plugin.urls[0]

    def do_wait_state(self, state, timeout):
        """{state: time it began} once state is reached."""
        if not self.client.wait_for_state(state, timeout=timeout):
            raise BenchError("state %s not reached within %s s (it is %s)" % (state, timeout, self.client.state))
        return self.states

    def do_wait_members(self, timeout):
        """(time, count) once every group's members are loaded."""
        def loaded():
            groups = self.client.contacts.groups()
            return groups and all(g.members_loaded for g in groups) and time.time()
        done = wait_until(loaded, timeout)
        if not done:
            raise BenchError("group members not loaded within %s s" % timeout)
        return done, sum(len(g.members) for g in self.client.contacts.groups())

    def do_friend_id(self):
        return self.client.contacts.friends()[0].id

    def do_hub_seq(self):
        return self.plugin.hub.seq

    def do_accepted(self, ids):
        """{id: time webqq accepted the message} of the ids it has accepted."""
        return {str(i): self.accepted[i] for i in ids if i in self.accepted}

    def do_store(self):
        """The store in use, its files' size in bytes, the post_api counters, and p50/p99 of the store
        writes since the last call."""
        store, times = self.plugin.store, sorted(self.add_times)
        self.add_times = array.array("d")
        size = sum(os.path.getsize(path) for path in (store.path or "", (store.path or "") + "-wal")
                   if os.path.exists(path))
        return {"store": "sqlite" if store.durable else "memory", "size": size, "writes": len(times),
                "write_p50": percentile(times, 0.5), "write_p99": percentile(times, 0.99),
                "counters": self.plugin.reporter.counters()}

    def do_parked(self):
        """How many long-polls wait in the servers' parkers (without a thread of their own)."""
        return sum(len(server.parker) for server in self.plugin.servers if server.parker is not None)

    def stop(self):
        self.client.stop()


class CeilingHandler(BaseHTTPRequestHandler):
    """The least a ThreadingHTTPServer can do per request: parse it, write prepared bytes."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        self.wfile.write(self.server.answers.get(self.path.partition("?")[0], self.server.not_found))

    def log_message(self, fmt, *args):
        pass


class CeilingPart(object):
    """A bare ThreadingHTTPServer answering each path with the bytes webqq answered it with."""

    def __init__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), CeilingHandler)
        self.server.daemon_threads = True
        self.server.answers = {}
        self.server.not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        self.thread = threading.Thread(target=self.server.serve_forever, name="bench-ceiling")
        self.thread.start()

    def do_url(self):
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def do_copy(self, url, path):
        """Fetch path from webqq at url and serve the same status line, headers and body; the body size."""
        import http.client
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        conn.request("GET", path)
        res = conn.getresponse()
        body = res.read()
        conn.close()
        if res.status != 200:
            raise BenchError("webqq answered %s with HTTP %d" % (path, res.status))
        head = "".join("%s: %s\r\n" % pair for pair in res.getheaders())
        self.server.answers[path] = ("HTTP/1.1 200 OK\r\n%s\r\n" % head).encode("latin-1") + body
        return len(body)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class ReceiverHandler(BaseHTTPRequestHandler):
    """post_api: notes when each received message arrives; answers with nothing to do."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        arrived = time.time()
        report = json.loads(body.decode("utf-8"))
        if report.get("post_type") == "receive_message":
            self.server.arrivals.setdefault(report.get("id"), arrived)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, fmt, *args):
        pass


class ReceiverPart(object):
    """A post_api receiver, and a check_event reader noting when each message is answered."""

    def __init__(self):
        sys.path.insert(0, ROOT)
        from webqq import TrackedHTTPServer
        self.server = TrackedHTTPServer(("127.0.0.1", 0), ReceiverHandler)
        self.server.arrivals = {}
        self.server.start()
        self.checked = {}
        self.reader = self.conn = None
        self.reading = threading.Event()

    def do_url(self):
        return "http://127.0.0.1:%d/post" % self.server.server_address[1]

    def do_read_events(self, url):
        """Long-poll check_event at url on a thread, noting each message's arrival."""
        import http.client
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
        self.reading.set()

        def run():
            while self.reading.is_set():
                try:
                    self.conn.request("GET", "/openqq/check_event")
                    body = self.conn.getresponse().read()
                except (OSError, http.client.HTTPException):
                    return
                arrived = time.time()
                for item in json.loads(body.decode("utf-8")):
                    if item.get("post_type") == "receive_message":
                        self.checked.setdefault(item.get("id"), arrived)
        self.reader = threading.Thread(target=run, name="bench-check-event")
        self.reader.start()

    def do_arrivals(self, ids):
        """[post_api, check_event] arrival times of each message id (None when it has not arrived)."""
        return [[self.server.arrivals.get(i), self.checked.get(i)] for i in ids]

    def do_arrived(self):
        """How many messages reached post_api."""
        return len(self.server.arrivals)

    def do_forget(self):
        self.server.arrivals.clear()
        self.checked.clear()

    def do_stop_reading(self):
        self.reading.clear()
        if self.conn is not None and self.conn.sock is not None:
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.reader is not None:
            self.reader.join()
            self.reader = None

    def stop(self):
        self.do_stop_reading()
        self.server.close()


###############################################################################
# 4. Load generator
###############################################################################


class Connection(object):
    """One keep-alive connection of the load generator and the answer it is reading."""

    __slots__ = ("sock", "head", "left", "status", "length", "sent")

    def __init__(self, sock):
        self.sock = sock
        self.head, self.left, self.status, self.length, self.sent = b"", None, None, None, 0.0


class Load(object):
    """Keep-alive HTTP/1.1 clients on one selector loop, each with one request in flight."""

    HEAD_MAX = 8192
    STALL = 120.0       # seconds without any answer after which the answers in flight count as errors

    def __init__(self, url, path, clients):
        parts = urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.request = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (path, parts.hostname, parts.port)).encode()
        self.buffer = bytearray(1 << 20)
        self.view = memoryview(self.buffer)
        self.selector = selectors.DefaultSelector()
        self.conns = [self.connect() for _ in range(clients)]
        self.latencies, self.errors, self.elapsed, self.cpu, self.started = [], 0, 0.0, 0.0, None

    def connect(self):
        sock = socket.create_connection(self.address, timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = Connection(sock)
        self.selector.register(sock, selectors.EVENT_READ, conn)
        return conn

    def send(self, conn):
        conn.head, conn.left, conn.status, conn.length = b"", None, None, None
        conn.sent = time.perf_counter()
        if conn.sock.send(self.request) != len(self.request):    # a small request into an empty buffer
            raise OSError("request cut short")

    def read(self, conn):
        """Read what has arrived on conn; True once its answer is complete."""
        n = conn.sock.recv_into(self.buffer)
        if n == 0:
            raise OSError("connection closed by the server")
        if conn.left is not None:
            conn.left -= n
            return conn.left <= 0
        take = min(n, self.HEAD_MAX)        # the head is in there; the rest of a big read is body
        conn.head += bytes(self.view[:take])
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            if take < n:
                raise OSError("answer head over %d bytes" % self.HEAD_MAX)
            return False
        lines = conn.head[:end].split(b"\r\n")
        conn.status = int(lines[0].split()[1])
        conn.length = next((int(line.split(b":", 1)[1]) for line in lines[1:]
                            if line.lower().startswith(b"content-length:")), 0)
        conn.left = conn.length - (len(conn.head) - end - 4) - (n - take)
        return conn.left <= 0

    def run(self, seconds=None, count=None):
        """Drive every connection for seconds, or until count answers; adds to the figures of summary().

        Answers still in flight at the end are awaited but not counted.
        """
        cpu, start = time.process_time(), time.perf_counter()
        if self.started is None:
            self.started = time.time()
        deadline = start + seconds if seconds else None
        issued = busy = 0
        for conn in self.conns:
            if count is None or issued < count:
                self.send(conn)
                issued += 1
                busy += 1
        last_event = start
        while busy:
            events = self.selector.select(1.0)
            now = time.perf_counter()
            if not events and now - last_event > self.STALL:
                self.errors += busy
                break
            for key, _ in events:
                conn, last_event = key.data, now
                try:
                    if not self.read(conn):
                        continue
                except OSError:
                    self.errors += 1
                    self.selector.unregister(conn.sock)
                    conn.sock.close()
                    self.conns.remove(conn)
                    busy -= 1
                    continue
                done = time.perf_counter()
                if deadline is None or done <= deadline:
                    self.latencies.append(done - conn.sent)
                    if conn.status != 200:
                        self.errors += 1
                if (deadline is not None and done < deadline) or (count is not None and issued < count):
                    self.send(conn)
                    issued += 1
                else:
                    busy -= 1
        end = min(time.perf_counter(), deadline) if deadline else time.perf_counter()
        self.elapsed += end - start
        self.cpu += time.process_time() - cpu

    def summary(self):
        """Answers per second, p50/p99 latency, errors and this process's CPU share over every run."""
        return {"count": len(self.latencies), "seconds": self.elapsed, "rps": len(self.latencies) / self.elapsed,
                "p50": percentile(self.latencies, 0.5), "p99": percentile(self.latencies, 0.99),
                "errors": self.errors, "cpu": self.cpu / self.elapsed, "started": self.started}

    def close(self):
        for conn in self.conns:
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
        self.selector.close()


class LoadPart(object):
    """The load generator process: timed runs, and long-pollers held open on a thread."""

    def __init__(self):
        self.poll = self.poll_thread = self.poll_result = None

    def do_run(self, url, path, clients, seconds=None, count=None):
        load = Load(url, path, clients)
        try:
            load.run(seconds, count)
            return load.summary()
        finally:
            load.close()

    def do_compare(self, urls, path, clients, seconds, slices):
        """Load each url for seconds in all, in turns of seconds/slices, on connections kept open."""
        loads = []
        try:
            for url in urls:
                loads.append(Load(url, path, clients))
            for _ in range(slices):
                for load in loads:
                    load.run(seconds / slices)
            return [load.summary() for load in loads]
        finally:
            for load in loads:
                load.close()

    def do_open_pollers(self, url, path, count):
        """Open count connections and send path on each; a thread reads their answers as they come."""
        self.poll = Load(url, path, count)
        self.poll_done = threading.Event()
        for conn in self.poll.conns:
            self.poll.send(conn)

        def run():
            load, busy, answers = self.poll, len(self.poll.conns), []
            while busy and not self.poll_done.is_set():
                for key, _ in load.selector.select(0.1):
                    conn = key.data
                    try:
                        complete = load.read(conn)
                    except OSError:
                        load.errors += 1
                        load.selector.unregister(conn.sock)
                        busy -= 1
                        continue
                    if complete:
                        answers.append((time.time(), conn.status, conn.length))
                        load.selector.unregister(conn.sock)
                        busy -= 1
            self.poll_result = {"answers": answers, "errors": load.errors, "unanswered": busy}
        self.poll_thread = threading.Thread(target=run, name="bench-pollers")
        self.poll_thread.start()
        return len(self.poll.conns)

    def do_poller_answers(self, timeout):
        """The long-pollers' answers within timeout: [time, status, body size] each, errors, unanswered."""
        self.poll_thread.join(timeout)
        self.poll_done.set()
        self.poll_thread.join()
        self.poll_thread = None
        self.poll.close()
        return self.poll_result

    def do_open_streams(self, url, path, count):
        """Open count event streams at path; a thread notes when each message (by id) reaches each."""
        self.streams = Streams(url, path, count)
        return len(self.streams.load.conns)

    def do_stream_figures(self, accepted, timeout):
        """Once every stream has each message of accepted ({id: time}), or after timeout: the figures."""
        streams, self.streams = self.streams, None
        return streams.figures({int(i): t for i, t in accepted.items()}, timeout)

    def stop(self):
        if self.poll_thread is not None:
            self.do_poller_answers(0)
        if getattr(self, "streams", None) is not None:
            self.streams.close()


class Streams(object):
    """Event streams read by one selector thread: when each message id (in its data) reached each
    stream, noted at the wake-up that found it, its parsing left for later."""

    MESSAGE_ID = re.compile(rb'"id":(\d+),"post_type"')

    def __init__(self, url, path, count):
        self.load = Load(url, path, count)
        self.buffers = {conn: b"" for conn in self.load.conns}
        self.arrivals = {}          # message id -> [time it reached a stream, ...]
        self.twice = self.closed = 0
        self.seen = {conn: set() for conn in self.load.conns}
        self.lock = threading.Lock()
        self.done = threading.Event()
        for conn in self.load.conns:
            self.load.send(conn)
        self.thread = threading.Thread(target=self.run, name="bench-streams")
        self.thread.start()

    def run(self):
        selector, buffer, view = self.load.selector, self.load.buffer, self.load.view
        while not self.done.is_set() and self.buffers:
            events = selector.select(0.1)
            now = time.time()
            with self.lock:
                for key, _ in events:
                    conn = key.data
                    try:
                        size = conn.sock.recv_into(buffer)
                    except BlockingIOError:
                        continue
                    except OSError:
                        size = 0
                    if not size:
                        selector.unregister(conn.sock)
                        del self.buffers[conn]
                        self.closed += 1
                        continue
                    blocks = (self.buffers[conn] + view[:size]).split(b"\n\n")
                    self.buffers[conn] = blocks.pop()
                    for block in blocks:
                        found = self.MESSAGE_ID.search(block)
                        if found is None:
                            continue
                        msg_id = int(found.group(1))
                        if msg_id in self.seen[conn]:
                            self.twice += 1
                            continue
                        self.seen[conn].add(msg_id)
                        self.arrivals.setdefault(msg_id, []).append(now)

    def figures(self, accepted, timeout):
        """Latency from acceptance to each stream (p50, p99, max; per message: the last stream), losses."""
        count = len(self.load.conns)
        def complete():
            with self.lock:
                return all(len(self.arrivals.get(i, ())) >= count for i in accepted)
        wait_until(complete, timeout, 0.05)
        self.close()
        every, lasts, lost = [], [], 0
        for msg_id, at in accepted.items():
            times = self.arrivals.get(msg_id, [])
            lost += count - len(times)
            every.extend(t - at for t in times)
            if times:
                lasts.append(max(times) - at)
        return {"streams": count, "messages": len(accepted), "lost": lost, "twice": self.twice,
                "closed": self.closed, "p50": percentile(every, 0.5), "p99": percentile(every, 0.99),
                "max": max(every) if every else None, "last_p50": percentile(lasts, 0.5),
                "last_p99": percentile(lasts, 0.99)}

    def close(self):
        self.done.set()
        self.thread.join()
        self.load.close()


ROLES = {"sim": SimPart, "webqq": WebqqPart, "ceiling": CeilingPart, "receiver": ReceiverPart, "load": LoadPart}


###############################################################################
# 5. Measurements
###############################################################################


class Bench(object):
    """Runs the items with its child processes and keeps every raw figure in results."""

    SLICES = 4      # turns webqq and the ceiling take within one run of an info route

    def __init__(self, cfg, workdir):
        self.cfg = cfg
        self.workdir = workdir
        self.log_path = os.path.join(workdir, "children.log")
        self.children = []
        self.results = {"config": cfg}
        self.clients = 0

    def child(self, role, **options):
        child = Child(role, self.log_path, **options)
        self.children.append(child)
        return child

    def drop(self, child):
        child.close()
        self.children.remove(child)

    def close(self):
        for child in reversed(list(self.children)):
            self.drop(child)

    def start_client(self, **openqq):
        """A new webqq process, logged in by a scan: (child, times) with confirm/updating/running/idle RSS."""
        self.clients += 1
        tmpdir = os.path.join(self.workdir, "client%d" % self.clients)
        os.mkdir(tmpdir)
        client = self.child("webqq", sim_url=self.sim_url, tmpdir=tmpdir, openqq=openqq)
        client.call("wait_state", state="scaning", timeout=60)
        idle = proc_status(client.pid)
        confirmed = self.sim.call("login", timeout=60)
        states = client.call("wait_state", state="running", timeout=120)
        return client, {"confirmed": confirmed, "updating": states["updating"] - confirmed,
                        "running": states["running"] - confirmed, "idle": idle}

    def run(self):
        cfg = self.cfg
        self.sim = self.child("sim", friends=cfg["friends"], groups=cfg["groups"], members=cfg["members"],
                              poll_hold=10.0)
        self.sim_url = self.sim.call("url")
        self.load = self.child("load")
        api = self.login()
        try:
            self.info(api)
            self.sends(api)
        finally:
            self.drop(api)
        self.events()
        self.durable()
        return self.results

    # 1, 2
    def login(self):
        """Login runs, each a new client: the times from the confirmed scan, RSS idle and loaded."""
        runs, client = [], None
        for n in range(self.cfg["runs"]):
            progress("login run %d/%d" % (n + 1, self.cfg["runs"]))
            if client is not None:
                self.drop(client)
            client, figures = self.start_client()
            loaded_at, members = client.call("wait_members", timeout=300)
            figures.update(members_loaded=loaded_at - figures["confirmed"], members=members,
                           loaded=proc_status(client.pid))
            runs.append(figures)
        self.results["login"] = runs
        return client

    # 3
    def info(self, client):
        """The info routes at 1, 8 and 32 clients, webqq and the ceiling taking turns within each run."""
        url = client.call("url")
        ceiling = self.child("ceiling")
        ceiling_url = ceiling.call("url")
        results = {}
        try:
            for route in INFO_ROUTES:
                path = "/openqq/" + route
                size = ceiling.call("copy", url=url, path=path)
                for clients in CLIENTS:
                    progress("%s at %d client(s)" % (route, clients))
                    pairs = []
                    for _ in range(self.cfg["runs"]):
                        cpu = [cpu_seconds(ceiling.pid), cpu_seconds(client.pid)]
                        figures = self.load.call("compare", urls=[ceiling_url, url], path=path, clients=clients,
                                                 seconds=self.cfg["seconds"], slices=self.SLICES)
                        pair = dict(zip(("ceiling", "webqq"), figures))
                        for (name, pid), before in zip((("ceiling", ceiling.pid), ("webqq", client.pid)), cpu):
                            if before is not None:
                                pair[name]["server_cpu"] = (cpu_seconds(pid) - before) / pair[name]["seconds"]
                        pairs.append(pair)
                    results["%s/%d" % (route, clients)] = {"bytes": size, "runs": pairs}
            self.results["served"] = proc_status(client.pid)
        finally:
            self.drop(ceiling)
        self.results["info"] = results

    # 4
    def sends(self, client):
        """send_friend_message: sync at 1 and 32 clients for a while, async for a count of sends."""
        url = client.call("url")
        path = "/openqq/send_friend_message?id=%s&content=bench" % client.call("friend_id")
        results = {}
        for clients in (1, 32):
            progress("sync send at %d client(s)" % clients)
            results["sync/%d" % clients] = [self.load.call("run", url=url, path=path, clients=clients,
                                                           seconds=self.cfg["seconds"])
                                            for _ in range(self.cfg["runs"])]
        progress("async send")
        runs = []
        for _ in range(self.cfg["runs"]):
            before = self.sim.call("sent_count")
            figures = self.load.call("run", url=url, path=path + "&async=1", clients=32, count=self.cfg["sends"])
            drained = self.sim.call("wait_sent", count=before + self.cfg["sends"], timeout=300)
            if drained is None:
                raise BenchError("the async sends did not all reach the simulator")
            figures["delivered_rps"] = self.cfg["sends"] / (drained - figures["started"])
            runs.append(figures)
        results["async/32"] = runs
        self.results["sends"] = results

    # 5, 6
    def events(self):
        """A client reporting to post_api: message latency, then the long-pollers."""
        receiver = self.child("receiver")
        client, _ = self.start_client(post_api=receiver.call("url"), check_event_timeout=self.cfg["hold"] + 90)
        try:
            client.call("wait_members", timeout=300)
            url = client.call("url")
            self.latency(client, receiver, url)
            receiver.call("stop_reading")
            self.pollers(client, url)
            self.streams(client, url)
            self.stream_load(client, url)
        finally:
            self.drop(client)
            self.drop(receiver)

    def latency(self, client, receiver, url):
        receiver.call("read_events", url=url)
        self.results["latency"] = [self.messages(receiver, self.cfg["messages"], self.cfg["rate"], "latency run %d/%d"
                                                 % (n + 1, self.cfg["runs"])) for n in range(self.cfg["runs"])]

    def messages(self, receiver, count, rate, what, ways=("post", "check")):
        """count messages injected at rate: latencies to each of ways (post_api, check_event) as
        {"p50", "p99"}, in total and beyond the simulator's delivery, and the count lost."""
        progress("%s: %d messages at %g/s" % (what, count, rate))
        self.sim.call("forget")
        receiver.call("forget")
        started = time.time()
        self.sim.call("inject", count=count, rate=rate)
        ids = self.sim.call("injected_ids")
        wait_until(lambda: receiver.call("arrived") >= count, 30 + count / 500.0, 0.1)
        if "check" in ways:
            wait_until(lambda: all(b is not None for _, b in receiver.call("arrivals", ids=ids)), 30, 0.1)
        arrivals = receiver.call("arrivals", ids=ids)
        timings = self.sim.call("timings", ids=ids)
        run = {"count": count, "seconds": time.time() - started}
        series = {"upstream": []}
        for way in ways:
            series[way], series[way + "_beyond"], run["lost_" + way] = [], [], 0
        for (injected, delivered), both in zip(timings, arrivals):
            if delivered is not None:
                series["upstream"].append(delivered - injected)
            for way, arrived in zip(("post", "check"), both):
                if way not in ways:
                    continue
                if arrived is None:
                    run["lost_" + way] += 1
                    continue
                series[way].append(arrived - injected)
                if delivered is not None:
                    series[way + "_beyond"].append(arrived - delivered)
        for name, values in series.items():
            run[name] = {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}
        return run

    def pollers(self, client, url):
        runs, count, hold = [], self.cfg["pollers"], self.cfg["hold"]
        idle = proc_status(client.pid).get("threads", 0)
        for n in range(self.cfg["runs"]):
            progress("%d long-pollers held %g s, run %d/%d" % (count, hold, n + 1, self.cfg["runs"]))
            wait_until(lambda: proc_status(client.pid).get("threads", 0) <= idle, 60, 0.05)   # the last run's
            before = proc_status(client.pid)
            seq = client.call("hub_seq")
            self.load.call("open_pollers", url=url, path="/openqq/check_event?cursor=%d" % seq, count=count)

            def waiting():          # parked, or each on a thread of its own
                return client.call("parked") + proc_status(client.pid).get("threads", idle) - idle >= count
            if not wait_until(waiting, 60, 0.05):
                progress("warning: not all %d long-pollers are waiting" % count)
            time.sleep(hold)
            waiting = proc_status(client.pid)
            msg_id, injected = self.sim.call("inject_one")
            answers = self.load.call("poller_answers", timeout=30)
            delivered = self.sim.call("timings", ids=[msg_id])[0][1]
            times = sorted(t for t, status, size in answers["answers"] if status == 200 and size > 2)
            runs.append({"count": count, "with_event": len(times), "errors": answers["errors"],
                         "unanswered": answers["unanswered"], "before": before, "waiting": waiting,
                         "upstream": delivered - injected if delivered else None,
                         "first": times[0] - delivered if times and delivered else None,
                         "last": times[-1] - delivered if times and delivered else None})
        self.results["pollers"] = runs

    def open_streams(self, client, url, count):
        """count event streams from the hub's cursor now (so none misses what comes next), once they are parked."""
        self.load.call("open_streams", url=url, path="/openqq/events?cursor=%d" % client.call("hub_seq"), count=count)
        if not wait_until(lambda: client.call("parked") >= count, 60, 0.05):
            progress("warning: not all %d streams are parked" % count)

    # 8
    def streams(self, client, url):
        runs, count = [], self.cfg["streams"]
        idle = proc_status(client.pid).get("threads", 0)
        for n in range(self.cfg["runs"]):
            progress("%d event streams, %d messages one at a time, run %d/%d" % (
                count, self.cfg["stream_events"], n + 1, self.cfg["runs"]))
            wait_until(lambda: proc_status(client.pid).get("threads", 0) <= idle, 60, 0.05)
            before = proc_status(client.pid)
            self.open_streams(client, url, count)
            time.sleep(1.0)
            held = proc_status(client.pid)
            ids = []
            for _ in range(self.cfg["stream_events"]):
                ids.append(self.sim.call("inject_one")[0])
                time.sleep(0.25)
            accepted = wait_until(lambda: (lambda a: len(a) == len(ids) and a)(client.call("accepted", ids=ids)),
                                  30, 0.05) or client.call("accepted", ids=ids)
            figures = self.load.call("stream_figures", accepted=accepted, timeout=30)
            figures.update(before=before, held=held, after=proc_status(client.pid),
                           unaccepted=len(ids) - len(accepted))
            runs.append(figures)
        self.results["streams"] = runs

    # 9
    def stream_load(self, client, url):
        count, rate, seconds = self.cfg["load_streams"], self.cfg["stream_rate"], self.cfg["stream_seconds"]
        progress("%d event streams, %g messages/s for %g s" % (count, rate, seconds))
        self.sim.call("forget")
        before = proc_status(client.pid)
        self.open_streams(client, url, count)
        self.sim.call("inject", count=int(rate * seconds), rate=rate)
        ids = self.sim.call("injected_ids")
        accepted = wait_until(lambda: (lambda a: len(a) == len(ids) and a)(client.call("accepted", ids=ids)),
                              30, 0.1) or client.call("accepted", ids=ids)
        figures = self.load.call("stream_figures", accepted=accepted, timeout=30)
        figures.update(before=before, after=proc_status(client.pid), unaccepted=len(ids) - len(accepted),
                       injected=len(ids))
        self.results["stream_load"] = figures

    # 10
    def durable(self):
        """post_api latency without and with the store, then the store under sustained and bulk load."""
        cfg = self.cfg
        receiver = self.child("receiver")
        results = {}
        try:
            for store in ("memory", "sqlite"):
                client, _ = self.start_client(post_api=receiver.call("url"), store=store)
                try:
                    client.call("wait_members", timeout=300)
                    client.call("store")
                    runs = [self.messages(receiver, cfg["messages"], cfg["rate"], "store %s, run %d/%d" % (
                        store, n + 1, cfg["runs"]), ways=("post",)) for n in range(cfg["runs"])]
                    results[store] = {"runs": runs, "store": client.call("store")}
                    results[store]["sustained"] = self.sustained(client, receiver)
                    if store == "sqlite":
                        results["bulk"] = self.bulk(client, receiver, results[store]["sustained"])
                finally:
                    self.drop(client)
        finally:
            self.drop(receiver)
        self.results["durable"] = results

    def sustained(self, client, receiver):
        """--sustained seconds of messages at --sustained-rate: latency, CPU, RSS, the store's writes."""
        cfg = self.cfg
        before = proc_status(client.pid)
        cpu = cpu_seconds(client.pid)
        count = int(cfg["sustained"] * cfg["sustained_rate"])
        run = self.messages(receiver, count, cfg["sustained_rate"], "sustained", ways=("post",))
        run.update(cpu=(cpu_seconds(client.pid) - cpu) / run["seconds"] if cpu is not None else None,
                   before=before, after=proc_status(client.pid), store=client.call("store"))
        return run

    def bulk(self, client, receiver, sustained):
        """Messages in batches of BULK_BATCH at --bulk-rate, each delivered before the next, until --reports
        reports went through the client: RSS and the store's size."""
        left = max(0, self.cfg["reports"] - sustained["store"]["counters"]["sent"])
        run = {"count": left, "lost_post": 0, "seconds": 0.0}
        while left > 0:
            batch = self.messages(receiver, min(left, BULK_BATCH), self.cfg["bulk_rate"],
                                  "bulk, %d to go" % left, ways=("post",))
            run["lost_post"] += batch["lost_post"]
            run["seconds"] += batch["seconds"]
            left -= batch["count"]
        run["after"] = proc_status(client.pid)
        run["store"] = client.call("store")
        return run


###############################################################################
# 6. The table
###############################################################################


def ms(seconds, digits=1):
    return "-" if seconds is None else "%.*f" % (digits, seconds * 1000)


def mb(kb):
    return "-" if kb is None else "%.1f MB" % (kb / 1024.0)


def machine():
    """nproc, CPU model, Python version and OS of this machine, in one line."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "%d cores (nproc), %s, Python %s, %s %s" % (os.cpu_count() or 0, model, platform.python_version(),
                                                       platform.system(), platform.release())


def table(results, quick):
    """The items and the targets as text."""
    cfg, out = results["config"], []
    say = out.append
    runs = cfg["runs"]
    say("webqq benchmark, %s" % results["date"])
    say("machine: %s" % results["machine"])
    say("command: %s" % results["command"])
    say("world: %d friends, %d groups x %d members, 1 discussion; median of %d run(s)%s" % (
        cfg["friends"], cfg["groups"], cfg["members"], runs, "; QUICK: a small world and short runs" if quick else ""))
    say("")

    login = results["login"]
    med = lambda key: median([r[key] for r in login])  # noqa: E731
    say("1. login, QR checked every %g s (the client option qr_check_interval)" % QR_CHECK_INTERVAL)
    say("   confirmed scan -> running                     %8s ms" % ms(med("running"), 0))
    say("     of which: confirmed scan -> updating        %8s ms" % ms(med("updating"), 0))
    say("   confirmed scan -> all %d members loaded    %8s ms   (in the background)" % (
        login[0]["members"], ms(med("members_loaded"), 0)))
    idle = median([r["idle"].get("rss") for r in login])
    rss = median([r["loaded"].get("rss") for r in login])
    peak = median([r["loaded"].get("peak") for r in login])
    say("")
    say("2. RSS of the client process")
    say("   idle, before login (QR shown)                 %10s" % mb(idle))
    say("   all %d members loaded: now                 %10s   (%s above idle)" % (
        login[0]["members"], mb(rss), mb(rss - idle) if rss and idle else "-"))
    say("   all %d members loaded: peak so far         %10s   (%s above idle)" % (
        login[0]["members"], mb(peak), mb(peak - idle) if peak and idle else "-"))
    served = results["served"]
    say("   after item 3 (info JSON cached): now / peak   %10s / %s" % (mb(served.get("rss")), mb(served.get("peak"))))

    say("")
    say("3. info routes, keep-alive clients, %g s per run in %d turns taken with the ceiling, a bare" % (
        cfg["seconds"], Bench.SLICES))
    say("   ThreadingHTTPServer (HTTP/1.1) answering the same bytes; p50/p99 latency in ms")
    say("   %-16s %7s %9s %7s %7s %9s %7s %7s %9s" % ("route", "clients", "webqq/s", "p50", "p99",
                                                     "ceiling/s", "p50", "p99", "webqq/ceil"))
    for route in INFO_ROUTES:
        for clients in CLIENTS:
            item = results["info"]["%s/%d" % (route, clients)]
            pairs = item["runs"]
            w = lambda key: median([p["webqq"][key] for p in pairs])  # noqa: E731
            c = lambda key: median([p["ceiling"][key] for p in pairs])  # noqa: E731
            ratio = median([p["webqq"]["rps"] / p["ceiling"]["rps"] for p in pairs if p["ceiling"]["rps"]])
            say("   %-16s %7d %9.0f %7s %7s %9.0f %7s %7s %8.0f %%" % (
                route, clients, w("rps"), ms(w("p50")), ms(w("p99")), c("rps"), ms(c("p50")), ms(c("p99")),
                100 * ratio))
        say("   %-16s (%d bytes; at 32 clients the webqq process used %.0f %% CPU, the ceiling %.0f %%, "
            "the load generator %.0f %%)" % (
                "", item["bytes"], 100 * (median([p["webqq"].get("server_cpu") for p in pairs]) or 0),
                100 * (median([p["ceiling"].get("server_cpu") for p in pairs]) or 0),
                100 * median([p["webqq"]["cpu"] for p in pairs])))
    errors = sum(p[s]["errors"] for item in results["info"].values() for p in item["runs"] for s in p)
    if errors:
        say("   errors (non-200 or broken answers): %d" % errors)

    say("")
    say("4. send_friend_message, send_interval 0 (p50/p99 ms)")
    sends = results["sends"]
    for key, label in (("sync/1", "sync, 1 client"), ("sync/32", "sync, 32 clients"),
                       ("async/32", "async, 32 clients")):
        rs = sends[key]
        line = "   %-18s %7.0f answers/s %8s %8s" % (label, median([r["rps"] for r in rs]),
                                                    ms(median([r["p50"] for r in rs]), 2),
                                                    ms(median([r["p99"] for r in rs]), 2))
        if key.startswith("async"):
            line += "   %d sends delivered upstream at %.0f/s" % (cfg["sends"], median([r["delivered_rps"] for r in rs]))
        say(line)
    errors = sum(r["errors"] for rs in sends.values() for r in rs)
    if errors:
        say("   errors (non-200 or broken answers): %d" % errors)

    say("")
    lat = results["latency"]
    say("5. message latency, %d messages at %g/s, half friend half group (p50/p99 ms)" % (cfg["messages"], cfg["rate"]))
    for key, label in (("upstream", "simulator: injected -> poll2 answer"),
                       ("post", "injected -> post_api received"),
                       ("check", "injected -> check_event answered"),
                       ("post_beyond", "beyond the upstream: -> post_api"),
                       ("check_beyond", "beyond the upstream: -> check_event")):
        say("   %-38s %8s %8s" % (label, ms(median([r[key]["p50"] for r in lat]), 2),
                                  ms(median([r[key]["p99"] for r in lat]), 2)))
    lost = sum(r["lost_post"] + r["lost_check"] for r in lat)
    if lost:
        say("   messages that never arrived: %d" % lost)

    say("")
    polls = results["pollers"]
    count = cfg["pollers"]
    say("6. %d check_event long-pollers (cursor mode) held %g s, then one message" % (count, cfg["hold"]))
    say("   event at webqq (poll2 answer) -> first poller answered  %8s ms" % ms(median([r["first"] for r in polls])))
    say("   event at webqq (poll2 answer) -> last poller answered   %8s ms" % ms(median([r["last"] for r in polls])))
    say("   pollers answered with the event                     %6d of %d" % (
        min(r["with_event"] for r in polls), count))
    before_rss = median([r["before"].get("rss") for r in polls])
    waiting_rss = median([r["waiting"].get("rss") for r in polls])
    say("   while they wait: RSS %s (%s before them, %.0f kB per poller), %s threads (%s before)" % (
        mb(waiting_rss), mb(before_rss),
        (waiting_rss - before_rss) / float(count) if waiting_rss and before_rss else 0,
        median([r["waiting"].get("threads") for r in polls]), median([r["before"].get("threads") for r in polls])))

    say("")
    say("7. %s" % ("this is the --quick run: every item, a small world, short runs" if quick else
                   "--quick runs every item small in under a minute (a smoke test; figures only)"))

    streams = results["streams"]
    sm = lambda key: median([r[key] for r in streams])  # noqa: E731
    smb = lambda when, key: median([r[when].get(key) for r in streams])  # noqa: E731
    say("")
    say("8. %d event streams (GET /openqq/events), %d messages one at a time; ms after webqq accepted each" % (
        cfg["streams"], cfg["stream_events"]))
    say("   at every stream: p50 / p99 / max                  %8s / %s / %s ms" % (
        ms(sm("p50")), ms(sm("p99")), ms(sm("max"))))
    say("   at the last stream of each message: p50 / p99     %8s / %s ms" % (ms(sm("last_p50")), ms(sm("last_p99"))))
    say("   deliveries lost %d, twice %d; streams cut %d" % (
        sum(r["lost"] for r in streams), sum(r["twice"] for r in streams), sum(r["closed"] for r in streams)))
    say("   threads %s before the streams, %s while held, %s after the messages" % (
        smb("before", "threads"), smb("held", "threads"), smb("after", "threads")))
    say("   RSS %s before, %s while held, %s after (%s more)" % (
        mb(smb("before", "rss")), mb(smb("held", "rss")), mb(smb("after", "rss")),
        mb(smb("after", "rss") - smb("before", "rss")) if smb("after", "rss") else "-"))

    load = results["stream_load"]
    say("")
    say("9. %d event streams while %g messages/s come in for %g s (one run)" % (
        cfg["load_streams"], cfg["stream_rate"], cfg["stream_seconds"]))
    say("   deliveries %d of %d (%d messages x %d streams): lost %d, twice %d; streams cut %d" % (
        load["messages"] * load["streams"] - load["lost"], load["injected"] * load["streams"], load["injected"],
        load["streams"], load["lost"] + load["unaccepted"] * load["streams"], load["twice"], load["closed"]))
    say("   ms after webqq accepted each: p50 / p99 / max     %8s / %s / %s ms" % (
        ms(load["p50"]), ms(load["p99"]), ms(load["max"])))
    say("   RSS %s before, %s after; threads %s before, %s after" % (
        mb(load["before"].get("rss")), mb(load["after"].get("rss")), load["before"].get("threads"),
        load["after"].get("threads")))

    say("")
    durable = results["durable"]
    say("10. durable delivery: %d messages at %g/s -> post_api, a client with store = memory, then one with the "
        "store" % (cfg["messages"], cfg["rate"]))
    say("   (p50/p99 ms; the store's write: on the thread that emits the event, per report)")
    for store in ("memory", "sqlite"):
        runs = durable[store]["runs"]
        say("   %-38s %8s %8s" % ("store = %s: injected -> post_api" % store, ms(median([r["post"]["p50"] for r in runs]), 2),
                                  ms(median([r["post"]["p99"] for r in runs]), 2)))
        say("   %-38s %8s %8s" % ("store = %s: beyond the upstream" % store,
                                  ms(median([r["post_beyond"]["p50"] for r in runs]), 2),
                                  ms(median([r["post_beyond"]["p99"] for r in runs]), 2)))
    written = durable["sqlite"]["store"]
    say("   %-38s %8s %8s   (%d writes)" % ("the store's write", ms(written["write_p50"], 3), ms(written["write_p99"], 3),
                                            written["writes"]))
    bulk = durable["bulk"]
    say("   %g messages/s for %g s (%d messages), injected -> post_api p50/p99 ms:" % (
        cfg["sustained_rate"], cfg["sustained"], durable["sqlite"]["sustained"]["count"]))
    for store in ("memory", "sqlite"):
        sustained = durable[store]["sustained"]
        writes = "the store's write %s / %s ms" % (ms(sustained["store"]["write_p50"], 3),
                                                   ms(sustained["store"]["write_p99"], 3)) if store == "sqlite" else ""
        say("     store = %-7s %7s %8s   lost %d; webqq CPU %.0f %%, RSS %s -> %s %s" % (
            store, ms(sustained["post"]["p50"], 2), ms(sustained["post"]["p99"], 2), sustained["lost_post"],
            100 * (sustained["cpu"] or 0), mb(sustained["before"].get("rss")), mb(sustained["after"].get("rss")),
            writes))
    counters = bulk["store"]["counters"]
    say("   then %d more, %d at a time at %g/s (%.0f s, lost %d): after %d reports, RSS %s (peak %s), store on disk "
        "%.1f MB" % (bulk["count"], BULK_BATCH, cfg["bulk_rate"], bulk["seconds"], bulk["lost_post"], counters["sent"],
                     mb(bulk["after"].get("rss")), mb(bulk["after"].get("peak")), bulk["store"]["size"] / 1048576.0))
    say("     post_api counters: %s" % ", ".join("%s %d" % item for item in sorted(counters.items())))

    say("")
    say("targets%s" % (" (set for the full world and runs; a quick run only indicates)" if quick else ""))
    ratio32 = median([p["webqq"]["rps"] / p["ceiling"]["rps"]
                      for p in results["info"]["get_friend_info/32"]["runs"] if p["ceiling"]["rps"]])
    post99 = median([r["post_beyond"]["p99"] for r in lat])
    above = (peak - idle) / 1024.0 if peak and idle else None
    last = median([r["last"] for r in polls])
    running = med("running")
    p99 = {store: median([r["post"]["p99"] for r in durable[store]["runs"]]) for store in ("memory", "sqlite")}
    checks = [
        ("get_friend_info at 32 clients >= 70 % of the ceiling", "%.0f %%" % (100 * ratio32), ratio32 >= 0.70),
        ("post_api p99 beyond the upstream's delivery < 20 ms", "%s ms" % ms(post99), post99 is not None and post99 < 0.020),
        ("all members loaded: < 60 MB RSS above an idle client", "%s MB (peak)" % ("-" if above is None else "%.1f" % above),
         above is not None and above < 60),
        ("%d long-pollers all answered within 200 ms" % count, "%s ms" % ms(last), last is not None and last < 0.200
         and min(r["with_event"] for r in polls) == count),
        ("running within 2 s of the confirmed scan", "%s ms" % ms(running, 0), running is not None and running < 2.0),
        ("post_api p99 with the store <= 2x without", "%s / %s ms" % (ms(p99["sqlite"]), ms(p99["memory"])),
         None not in p99.values() and p99["sqlite"] <= 2 * p99["memory"]),
        ("%g messages/s for %g s with the store, none lost" % (cfg["sustained_rate"], cfg["sustained"]),
         "%d lost" % durable["sqlite"]["sustained"]["lost_post"], durable["sqlite"]["sustained"]["lost_post"] == 0),
    ]
    held = median([r["held"].get("threads", 0) - r["before"].get("threads", 0) for r in streams])
    grown = smb("after", "rss") - smb("before", "rss") if smb("after", "rss") else None
    stream_lost = sum(r["lost"] + r["twice"] + r["unaccepted"] * r["streams"] for r in streams)
    load_lost = load["lost"] + load["twice"] + load["unaccepted"] * load["streams"]
    checks += [
        ("%d streams: each message at every one, p99 <= 50 ms" % cfg["streams"], "%s ms" % ms(sm("p99")),
         sm("p99") is not None and sm("p99") <= 0.050 and stream_lost == 0),
        ("%d streams: threads flat" % cfg["streams"], "%+d threads" % held, held <= 0),
        ("%d streams: RSS growth <= 30 MB" % cfg["streams"], "%s" % mb(grown), grown is not None and grown <= 30 * 1024),
        ("%d streams, %g msg/s for %g s: none lost" % (cfg["load_streams"], cfg["stream_rate"], cfg["stream_seconds"]),
         "%d lost or twice" % load_lost, load_lost == 0),
    ]
    for text, figure, met in checks:
        say("   %-56s %14s   %s" % (text, figure, "met" if met else "NOT met"))
    return "\n".join(out) + "\n"


###############################################################################
# 7. Command line
###############################################################################


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small version of each item (under a minute)")
    for name, kind, what in (("friends", int, "friends in the world"), ("groups", int, "groups in the world"),
                             ("members", int, "members per group"), ("runs", int, "runs per figure (median)"),
                             ("seconds", float, "seconds per load run"), ("sends", int, "async sends per run"),
                             ("messages", int, "messages per latency run"), ("rate", float, "messages per second"),
                             ("pollers", int, "check_event long-pollers"), ("hold", float, "seconds they are held"),
                             ("streams", int, "event streams held"), ("stream_events", int, "messages to them"),
                             ("load_streams", int, "event streams under load"),
                             ("stream_rate", float, "messages per second to them"),
                             ("stream_seconds", float, "seconds of that load"),
                             ("sustained", float, "seconds of sustained messages with the store"),
                             ("sustained_rate", float, "messages per second then"),
                             ("bulk_rate", float, "messages per second of the batches up to --reports"),
                             ("reports", int, "reports in all through the store")):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help="%s (full %s, quick %s)" % (what, FULL[name], QUICK[name]))
    parser.add_argument("--json", metavar="FILE", help="write every raw figure to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, client files)")
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return serve_child(args.child[0], json.loads(args.child[1]))

    cfg = dict(QUICK if args.quick else FULL)
    cfg.update((name, getattr(args, name)) for name in FULL if getattr(args, name) is not None)
    workdir = tempfile.mkdtemp(prefix="webqq-bench-")
    bench = Bench(cfg, workdir)
    started = time.time()
    try:
        results = bench.run()
    except BenchError as e:
        progress("failed: %s" % e)
        args.keep = True
        return 1
    finally:
        bench.close()
        if args.keep:
            progress("work folder kept: %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results.update(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), machine=machine(),
                   command="python scripts/bench.py" + "".join(" " + a for a in (argv or sys.argv[1:])),
                   elapsed=time.time() - started)
    sys.stdout.write(table(results, args.quick))
    sys.stdout.write("(the benchmark took %.0f s)\n" % results["elapsed"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
