"""Shared fixtures and helpers: a simulator on 127.0.0.1:0, clients pointed at it, an HTTP receiver."""
import collections
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

import webqq  # noqa: E402
from smartqq_sim import Simulator, png_chunk  # noqa: E402,F401 (png_chunk: for the tests)

SMALL_WORLD = {"friends": 6, "groups": 2, "members": 6, "discusses": 1, "seed": 7}


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory):
    """A certificate and key for 127.0.0.1 in one PEM file, made for the tests by openssl."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    pem, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-keyout", key, "-out", pem, "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(pem, "a") as out, open(key) as f:
        out.write(f.read())
    return pem


@pytest.fixture
def sim():
    """A running simulator with a small generated world; polls are held 1 s."""
    s = Simulator(world=SMALL_WORLD, poll_hold=1.0)
    s.start()
    yield s
    s.stop()


class Recorder(object):
    """Every event a client emits, in order, with a condition to wait on. It hears each event after
    the plugins loaded before the client started: once wait() saw an event, they have handled it."""

    def __init__(self, client):
        self.events = []
        self.cond = threading.Condition()
        client.on("all_event", self.record)
        start = client.start

        def start_after_the_plugins():
            client.off("all_event", self.record)
            client.on("all_event", self.record)
            start()
        client.start = start_after_the_plugins

    def record(self, name, *args):
        with self.cond:
            self.events.append((name, args))
            self.cond.notify_all()

    def named(self, name):
        with self.cond:
            return [args for n, args in self.events if n == name]

    def wait(self, name, count=1, timeout=10.0, where=None):
        """The args of the count-th event called name (matching where), waiting up to timeout."""
        def found():
            hits = [args for n, args in self.events if n == name and (where is None or where(*args))]
            return hits[count - 1] if len(hits) >= count else None
        with self.cond:
            self.cond.wait_for(lambda: found() is not None, timeout)
            result = found()
        assert result is not None, "no %s event (count %d) within %s s" % (name, count, timeout)
        return result


@pytest.fixture
def make_client(sim, tmp_path):
    """make_client(**options): a Client aimed at the simulator, stopped after the test."""
    clients = []

    def make(**options):
        opts = dict(smartqq_base=sim.url, tmpdir=str(tmp_path), qr_check_interval=0.05, send_interval=0,
                    qrcode_display="none", poll_timeout=10, http_timeout=5, log_level="debug")
        opts.update(options)
        client = webqq.Client(**opts)
        client.recorder = Recorder(client)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.stop()


def scan_and_confirm(sim, timeout=10.0):
    assert sim.wait_qr("waiting", timeout=timeout)
    sim.scan()
    sim.confirm()


def log_in(sim, client):
    """Start client, scan and confirm its QR code at sim, and see it running; returns client."""
    client.start()
    scan_and_confirm(sim)
    assert client.wait_for_state("running", timeout=10)
    return client


@pytest.fixture
def running(sim, make_client):
    """A client logged in to the simulator by a QR scan, in state running."""
    return log_in(sim, make_client())


def wait_until(predicate, timeout=10.0, interval=0.02):
    """predicate()'s first true value, polling it until timeout; else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def admin_group(client):
    """The first group the client's account created or manages."""
    return [g for g in client.contacts.groups() if g.role in ("create", "manage")][0]


def ephemeral_low():
    """The first port of the kernel's range for outgoing connections (32768 where it can't be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


HANDED_OUT = set()


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago, below the range the kernel gives outgoing
    connections (so that none of them takes it before the program under test binds it), and never
    the same one twice in a test session."""
    top = ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, top - 12000), top)
        if port in HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LogLines(logging.Handler):
    """The webqq logger's records at level or above, formatted (tracebacks included), from now until close()."""

    def __init__(self, level=logging.DEBUG, formatter=None):
        logging.Handler.__init__(self, level)
        self.setFormatter(formatter)
        self.lines, self.logger = [], logging.getLogger("webqq")
        self.logger.addHandler(self)

    def emit(self, record):
        self.lines.append(self.format(record))

    def close(self):
        self.logger.removeHandler(self)
        logging.Handler.close(self)


@pytest.fixture(autouse=True)
def no_thread_dies():
    """Fails the test in which a thread of webqq died: its guard (webqq.Thread) logs the exception
    rather than let it reach pytest's unhandled-thread-exception check."""
    errors = LogLines(logging.ERROR)
    yield
    errors.close()
    deaths = [line for line in errors.lines if "(thread " in line and " died" in line]
    assert not deaths, "a thread died:\n" + "\n".join(deaths)


# -- an HTTP receiver: a post_api or poll_api endpoint -------------------------------------------

class Answer(collections.namedtuple("Answer", "status body content_type delay location",
                                    defaults=(b"ok", "text/plain", 0, None))):
    """A Receiver's answer, sent after delay seconds; a location makes it a redirect."""
    __slots__ = ()


Hit = collections.namedtuple("Hit", "method path headers body report")
Hit.__doc__ = """One request a Receiver got: headers a dict, report the body decoded as JSON (None without a body)."""


class Receiver(object):
    """An HTTP/1.1 endpoint on 127.0.0.1 recording every request (hits) and answering it with the next
    Answer of script, else with respond(hit): an Answer, JSON data, or None for 200 "ok"."""

    def __init__(self, respond=lambda hit: None):
        self.hits, self.script, self.respond = [], collections.deque(), respond
        self.cond, self.down = threading.Condition(), threading.Event()
        self.port = 0
        self.start()
        self.base = "http://127.0.0.1:%d" % self.port
        self.url = self.base + "/post"

    def start(self):
        """Listen (again, on the same port after a close())."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True      # the body written after the head goes out at once, not 40 ms later

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                report = json.loads(body.decode("utf-8")) if body else None
                answer = receiver.answer(Hit(self.command, self.path, dict(self.headers), body, report))
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                if answer.location:
                    self.send_header("Location", answer.location)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.down.clear()
        self.server = webqq.TrackedHTTPServer(("127.0.0.1", self.port), Handler).start()
        self.port = self.server.port

    def answer(self, hit):
        """Record hit; the Answer for it, once its delay has passed (or the receiver closed)."""
        with self.cond:
            self.hits.append(hit)
            self.cond.notify_all()
            answer = self.script.popleft() if self.script else None
        answer = self.respond(hit) if answer is None else answer
        if not isinstance(answer, Answer):
            answer = Answer(200) if answer is None else Answer(200, json.dumps(answer).encode(), "application/json")
        self.down.wait(answer.delay)
        return answer

    def reports(self, where=None):
        """The JSON bodies received, in order, those matching where if given."""
        with self.cond:
            found = [hit.report for hit in self.hits if hit.body]
        return [r for r in found if where is None or where(r)]

    def wait(self, where, count=1, timeout=10.0):
        """The count-th report matching where, waiting up to timeout for it."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.reports(where)) >= count, timeout)
        found = self.reports(where)
        assert len(found) >= count, "no report %d within %s s; last: %r" % (count, timeout, self.reports()[-3:])
        return found[count - 1]

    def close(self):
        """Stop listening and cut the open connections: the endpoint is down until start()."""
        self.down.set()
        self.server.close()


@pytest.fixture
def make_receiver():
    """make_receiver(respond=...): a Receiver, closed after the test."""
    receivers = []

    def make(**options):
        receivers.append(Receiver(**options))
        return receivers[-1]

    yield make
    for receiver in receivers:
        receiver.close()


# -- webqq as people start it: a subprocess ------------------------------------------------------

WEBQQ_PY = os.path.join(ROOT, "webqq.py")


class Program(object):
    """webqq started as people start it, in a process of its own: `python webqq.py ARGS` (or command
    + ARGS, e.g. an installed `webqq`), in folder cwd; standard error (the log) and standard output
    go to files there."""

    def __init__(self, args, cwd, command=None, env=None, stdin=subprocess.DEVNULL):
        self.cwd = str(cwd)
        self.command = list(command or [sys.executable, WEBQQ_PY]) + [str(arg) for arg in args]
        environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("WEBQQ_")}
        environ.update(PYTHONUNBUFFERED="1", **(env or {}))
        self.err_path, self.out_path = os.path.join(self.cwd, "stderr.log"), os.path.join(self.cwd, "stdout.log")
        with open(self.err_path, "ab") as err, open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=environ, stdin=stdin, stdout=out,
                                         stderr=err)
        self.pid = self.proc.pid

    def log(self):
        """What the program wrote to standard error so far."""
        with open(self.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def output(self):
        with open(self.out_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_log(self, pattern, timeout=20.0):
        """The first match of the regular expression pattern in the log, waiting for it; fails the test
        (with the log) when it does not come, or the program ends first."""
        regex = re.compile(pattern)
        found = wait_until(lambda: regex.search(self.log()) or (self.proc.poll() is not None and "ended"),
                           timeout, 0.05)
        assert found and found != "ended", "no %r in the log of %s (exit status %s):\n%s" % (
            pattern, " ".join(self.command[1:]), self.proc.poll(), self.log()[-4000:])
        return found

    def wait(self, timeout=20.0):
        """The exit status, waiting for the program to end by itself."""
        return self.proc.wait(timeout)

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        """Send sig (if it still runs) and wait for the end: the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def assert_no_traceback(self):
        log = self.log()
        assert "Traceback" not in log, "a traceback in the log of %s:\n%s" % (" ".join(self.command[1:]), log[-6000:])


@pytest.fixture
def launch(tmp_path):
    """launch(*args, command=None, cwd=None, env=None): a Program in tmp_path (or cwd); every one is
    killed after the test if it still runs, and its log is checked for tracebacks."""
    programs = []

    def start(*args, **kwargs):
        kwargs.setdefault("cwd", tmp_path)
        programs.append(Program(args, **kwargs))
        return programs[-1]

    yield start
    for program in programs:
        program.kill()
    for program in programs:
        program.assert_no_traceback()
