"""Hostile input for the Openqq API: 10,000 malformed requests on loopback, bounded in time.

Bad methods and request lines, huge headers and bodies, invalid percent-encoding, invalid UTF-8
and GBK bytes, duplicated and array parameters, path traversal, JSONP callback injection,
pipelining, random bytes, and slow-loris connections, all over raw sockets (`requests` would
refuse or repair most of them). Every request must get a complete answer within TIMEOUT, JSON with
a `code` and a `status` when it is an error, never a 5xx (an unknown method gets 405, an unknown
transfer coding or protocol version 400); a request that never arrives whole is cut off once request_timeout has passed; nothing in the log may carry
a traceback, the server's memory must stay flat, and the client must keep receiving messages.
"""
import collections
import ctypes
import gc
import json
import logging
import random
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

import webqq
from conftest import wait_until
from smartqq_sim import Simulator

REQUESTS = 10000        # in all, slow-loris connections included
WARMUP = 2000           # requests (slow-loris ones included) before the memory baseline is taken
WORKERS = 8
TIMEOUT = 5.0           # every request is answered within this
REQUEST_TIMEOUT = 1.5   # the server's request_timeout: how long a request may take to arrive
SLOW_LORIS = 120        # slow connections among the REQUESTS, 30 at a time
RSS_BOUND_KB = 32 * 1024     # what the allocators may keep: pymalloc arenas pinned by a few live objects
BLOCKS_BOUND = 20000         # Python objects (pymalloc blocks) the 8,000 measured requests may leave behind
SEED = 20240501
FORM = "application/x-www-form-urlencoded"

# What an answer may carry; anything else would be an injected header.
HEADERS = {"server", "date", "content-type", "content-length", "x-content-type-options", "connection",
           "retry-after", "x-cursor", "access-control-allow-origin", "access-control-allow-methods",
           "access-control-allow-headers", "access-control-max-age", "vary", "allow"}
JSONP = re.compile(rb"^[A-Za-z0-9_.$]{1,128}\((.*)\)$", re.S)
ROUTES = ["get_user_info", "get_friend_info", "get_group_info", "get_group_basic_info", "get_discuss_info",
          "search_friend", "search_group", "send_friend_message", "send_group_message", "send_discuss_message",
          "send_sess_message", "shutup_group_member", "kick_group_member", "check_event", "get_client_info"]
# stop_client and relogin are never asked for: the fuzz must not reach them (checked at the end).
METHODS = ["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE", "CONNECT", "PROPFIND", "FOO",
           "get", "Get", "PRI", "M-SEARCH", "A" * 300, "G\x00T", "GET\tX", "\xc3\xa9", "X" * 70000]
PERCENT = ["%", "%z", "%zz", "%4", "%C3%28", "%FF%FE", "%ED%A0%80", "%C0%AF", "%00", "%25", "%%41", "%E4%BD",
           "%F0%9F%98%80", "%u4F60", "%2e%2e%2f", "+", "%20%0D%0A", "%C3", "%80"]
TRAVERSAL = ["/openqq/../openqq/get_user_info", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
             "//openqq//get_user_info", "/openqq/get_user_info/", "/openqq/./get_user_info", "/openqq/get_user_info%00",
             "/openqq/stop_client/..", "/openqq/x/../stop_client", "\\openqq\\stop_client", "/OPENQQ/STOP_CLIENT",
             "/openqq/stop_client%20", "/openqq/stop_client;x", "/openqq/%73top_client", "/openqq/relogin/",
             "/openqq/..%2fstop_client", "/openqq/get_user_info/../../relogin", "/" + "../" * 200,
             "/openqq/" + "a" * 5000, "*", "/openqq/check_event/../../../../../../proc/self/environ"]
CALLBACKS = ["alert(1)", "<script>alert(1)</script>", "a;b", "a\r\nX-Injected: 1", "a b", "a\x00", "a" * 129, "",
             "jQuery123_456", "a.b$c", "函数", "cb)//", "a'b", "__proto__", "a%0d%0aSet-Cookie:x=1", "window.top"]
CHARSETS = ["utf-8", "gbk", "gb2312", "latin-1", "utf-16", "utf-32", "undefined", "rot13", "base64", "x-unknown",
            "utf-7", "idna", "", "utf-8;charset=gbk", '"gbk"']


class Answer(object):
    """One HTTP answer read off a raw socket."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body


def read_answers(sock, count, head=False):
    """Up to count answers (1xx skipped); stops early when the server closes the connection."""
    data, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return answers
            data += chunk
        top, _, data = data.partition(b"\r\n\r\n")
        lines = top.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if 100 <= status < 200:
            continue
        length = 0 if head else int(headers.get("content-length", 0))
        while len(data) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        answers.append(Answer(status, headers, data[:length]))
        data = data[length:]
        if headers.get("connection", "").lower() == "close":
            break
    return answers


# kind: what is tried; data: the bytes sent; answers: how many answers at most; head: a HEAD request;
# early: the answer comes before the announced body.
Case = collections.namedtuple("Case", "kind data answers head early")


def case(kind, data, answers=1, head=False, early=False):
    return Case(kind, data if isinstance(data, bytes) else raw(data), answers, head, early)


def raw(text):
    """text as bytes on the wire: Latin-1 where it can be (so "\xc3\xa9" stays two bytes), else UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def request(method="GET", target="/openqq/get_user_info", headers=(), body=b"", version="HTTP/1.1"):
    head = "%s %s %s\r\nHost: 127.0.0.1\r\n" % (method, target, version)
    head += "".join("%s: %s\r\n" % pair for pair in headers)
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        head += "Content-Length: %d\r\n" % len(body)
    return raw(head) + b"\r\n" + body


class Fuzzer(object):
    """Generates the malformed requests, kind by kind, from one seeded random source."""

    def __init__(self, seed, world):
        self.rng = random.Random(seed)
        self.world = world

    def pick(self, items):
        return self.rng.choice(items)

    def route(self):
        return "/openqq/" + self.pick(ROUTES)

    def value(self):
        """A parameter value: numbers, ids of the world, text, junk."""
        r = self.rng.random()
        if r < 0.3:
            return str(self.pick([f.uin for f in self.world.friends] + [g.gid for g in self.world.groups]))
        if r < 0.5:
            return str(self.rng.randrange(-10, 10 ** self.rng.randrange(1, 30)))
        if r < 0.7:
            return "".join(self.rng.choice("abc你好[微笑]<>&;'\" \t") for _ in range(self.rng.randrange(0, 20)))
        return "".join(chr(self.rng.randrange(32, 0x2FFF)) for _ in range(self.rng.randrange(1, 10)))

    def query(self, n=None):
        names = ["id", "uid", "name", "content", "group_id", "member_id", "time", "cursor", "datatype", "callback",
                 "async", "displayname", "gname", "__class__", "to_json", "members", "x" * 300, ""]
        pairs = []
        for _ in range(n if n is not None else self.rng.randrange(0, 6)):
            pairs.append("%s=%s" % (quote(self.pick(names)), quote(self.value())))
        return "&".join(pairs)

    # -- the kinds --------------------------------------------------------------------------

    def methods(self):
        method = self.pick(METHODS)
        return case("method", request(method, self.route() + "?" + self.query()), head=method == "HEAD")

    def request_lines(self):
        target = self.route() + "?" + self.query()
        line = self.pick([
            "GET %s\r\n\r\n" % target, "GET %s HTTP/2.0\r\n\r\n" % target, "GET %s HTTP/9.9\r\n\r\n" % target,
            "GET %s HTTP/1.1 extra\r\n\r\n" % target, "GET %s HTTP/1.x\r\n\r\n" % target,
            "GET %s HTTP/01.01\r\nHost: x\r\n\r\n" % target, "GET %s http/1.1\r\n\r\n" % target,
            "GET  %s  HTTP/1.1\r\n\r\n" % target, "\r\n\r\nGET %s HTTP/1.1\r\n\r\n" % target,
            "GET %s HTTP/1.0\r\n\r\n" % target, "GET http://evil.example%s HTTP/1.1\r\n\r\n" % target,
            "GET http://x HTTP/1.1\r\n\r\n", "GET %s HTTP/1.1\n\n" % target, "GET\r\n\r\n", " \r\n\r\n",
            "GET %s HTTP/1.1\r\nHost: x\r\n" % ("/" + "a" * 70000),
        ])
        return case("request line", line)

    def headers(self):
        target = self.route()
        kind = self.rng.randrange(12)
        if kind == 0:
            data = request(target=target, headers=[("X-Big", "a" * self.rng.randrange(60000, 70000))])
        elif kind == 1:
            data = request(target=target, headers=[("X-H%d" % i, "v") for i in range(self.rng.randrange(90, 200))])
        elif kind == 2:
            data = request(target=target, headers=[("No colon here", "")]).replace(b"No colon here: ", b"No colon here")
        elif kind == 3:
            data = request(target=target, headers=[("X-Nul", "a\x00b"), ("X-Fold", "a\r\n b")])
        elif kind == 4:
            data = request("POST", target, [("Content-Length", "5"), ("Content-Length", "50")], b"id=1&")
        elif kind == 5:
            data = request("POST", target, [("Content-Length", self.pick(["-1", "abc", "1e3", "0x10", " ", "9" * 40]))],
                           b"id=1")
        elif kind == 6:
            coding = self.pick(["gzip", "chunked, gzip", "x", "identity, chunked"])
            data = request("POST", target, [("Transfer-Encoding", coding)], b"0\r\n\r\n")
            return case("header", data)
        elif kind == 7:
            size = self.pick(["-1", "-ff", "zz", "ffffffffffff", "1;" + "x" * 2000, "0x5", ""])
            data = request("POST", target, [("Transfer-Encoding", "chunked")],
                           ("%s\r\nid=1&\r\n0\r\n\r\n" % size).encode())
        elif kind == 8:
            data = request("POST", target, [("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
                           b"5\r\nid=12\r\n0\r\n\r\n")
        elif kind == 9:
            host = self.pick(["", "a" * 5000, "evil.example", "[::1", "x:y:z"])
            data = request(target=target, headers=[("Host", host)])
        elif kind == 10:
            data = request("POST", target, [("Expect", "100-continue"), ("Content-Type", FORM)],
                           self.query(3).encode("latin-1", "replace"))
        else:
            data = request(target=target, headers=[("Cookie", "a=" + "b" * 8000),
                                                   ("Authorization", "Bearer " + "x" * 3000)])
        return case("header", data)

    def bodies(self):
        target = self.route()
        kind = self.rng.randrange(9)
        ctype = FORM
        if kind == 0:
            return case("body", request("POST", target, [("Content-Length", str(10 ** self.rng.randrange(7, 16)))]))
        if kind == 1:
            return case("body", request("POST", target, [("Content-Length", "1500000")]), early=True)
        if kind == 2:
            body = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 3000)))
        elif kind == 3:
            ctype = "application/json"
            depth = self.rng.randrange(500, 200000)
            body = self.pick([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth])
        elif kind == 4:
            ctype = "application/json"
            body = self.pick([b'{"id":1e999}', b'{"id":' + b"9" * 5000 + b"}", b"[1,2]", b"null", b'"x"',
                              b'{"id":[1,[2]]}', b'{"id":{"a":1}}', b'{"id":null,"content":true}', b"{", b"\xff\xfe{}",
                              b'{"id":NaN}', b'{"\\ud800":1}'])
        elif kind == 5:
            boundary = self.pick(["x", "", "a" * 100, '"quoted"'])
            ctype = "multipart/form-data; boundary=%s" % boundary
            body = ("--x\r\nContent-Disposition: form-data; name=\"id\"\r\n"
                    "Content-Type: text/plain; charset=%s\r\n\r\n1\r\n--x--\r\n" % self.pick(CHARSETS)).encode()
            if self.rng.random() < 0.5:
                body = body[:self.rng.randrange(len(body))]
        elif kind == 6:
            ctype = "application/x-www-form-urlencoded; charset=%s" % self.pick(CHARSETS)
            body = self.query(3).encode("latin-1", "replace")
        elif kind == 7:
            body = ("content=" + "a" * self.rng.randrange(100000, 900000)).encode()
        else:
            ctype = self.pick(["text/plain", "application/xml", "multipart/mixed", "",
                               "application/json; charset=undefined"])
            body = self.query(4).encode("latin-1", "replace")
        return case("body", request("POST", target, [("Content-Type", ctype)], body))

    def percent(self):
        bad = "".join(self.pick(PERCENT) for _ in range(self.rng.randrange(1, 4)))
        where = self.rng.randrange(4)
        if where == 0:
            target = self.route() + "?" + bad + "=1"
        elif where == 1:
            target = self.route() + "?id=" + bad
        elif where == 2:
            target = "/openqq/" + bad + "get_user_info"
        else:
            return case("percent", request("POST", self.route(), [("Content-Type", FORM)], ("name=" + bad).encode()))
        return case("percent", request(target=target))

    def raw_bytes(self):
        text = self.pick(["你好世界", "群消息", "[微笑]", "\u00e9t\u00e9", "\U0001F600"])
        encoded = self.pick([text.encode("gbk", "replace"), text.encode("utf-8"), text.encode("utf-8")[:-1],
                             bytes(self.rng.randrange(128, 256) for _ in range(5))])
        where = self.rng.randrange(4)
        if where == 0:
            data = b"GET /openqq/search_friend?name=" + encoded + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        elif where == 1:
            data = b"GET /openqq/" + encoded + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        elif where == 2:
            data = b"GET /openqq/get_user_info HTTP/1.1\r\nHost: x\r\nX-Name: " + encoded + b"\r\n\r\n"
        else:
            charset = self.pick(["gbk", "utf-8", "gb18030", ""])
            body = b"name=" + quote(encoded, safe="").encode() + b"&content=" + encoded
            data = request("POST", "/openqq/search_friend", [("Content-Type", "application/x-www-form-urlencoded" +
                                                                 ("; charset=" + charset if charset else ""))], body)
        return case("encoding", data)

    def duplicates(self):
        route = self.pick(ROUTES)
        name = self.pick(["id", "uid", "content", "callback", "datatype", "access_token", "cursor", "async",
                          "member_id", "group_id", "time", "name"])
        friend = self.pick(self.world.friends).uin
        query = "&".join(self.pick(["%s=%s" % (name, friend), "%s[]=%s" % (name, friend), "%s=" % name, name,
                                    "%s=%s" % (name, self.value())]) for _ in range(self.rng.randrange(2, 5)))
        if route.startswith(("send_", "kick_", "shutup_")):
            query += "&id=%s&id=%s&group_id=1&group_id=2&member_id=1&member_id=2" % (friend, friend)
        if self.rng.random() < 0.3:
            body = json.dumps({name: self.pick([[friend, friend], [[1]], {"a": 1}, None, True, 1.5, "x"]),
                               "id": [friend, 0]}).encode()
            return case("duplicate", request("POST", "/openqq/" + route + "?" + query,
                                             [("Content-Type", "application/json")], body))
        return case("duplicate", request(target="/openqq/" + route + "?" + query))

    def traversal(self):
        target = self.pick(TRAVERSAL)
        method = self.pick(["GET", "POST", "HEAD"])
        return case("traversal", request(method, target), head=method == "HEAD")

    def jsonp(self):
        callback = self.pick(CALLBACKS)
        encoded = quote(callback, safe="") if self.rng.random() < 0.7 else callback.replace(" ", "%20")
        target = "%s?datatype=jsonp&callback=%s&%s" % (self.route(), encoded, self.query(1))
        return case("jsonp", request(target=target.replace("\r", "%0D").replace("\n", "%0A")))

    def pipelined(self):
        count = self.rng.randrange(2, 5)
        data = b"".join(request(target="/openqq/" + self.pick(["get_user_info", "get_client_info", "search_friend?id=1",
                                                              "nope", "check_event?cursor=x"]))
                        for _ in range(count))
        return case("pipelined", data, answers=count)

    def garbage(self):
        data = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 2000)))
        return case("garbage", data.replace(b"\n", b" ") + b"\r\n\r\n")

    KINDS = [("methods", 8), ("request_lines", 6), ("headers", 10), ("bodies", 8), ("percent", 12), ("raw_bytes", 8),
             ("duplicates", 12), ("traversal", 8), ("jsonp", 8), ("pipelined", 4), ("garbage", 6)]

    def cases(self, count):
        kinds = [name for name, weight in self.KINDS for _ in range(weight)]
        return [getattr(self, self.rng.choice(kinds))() for _ in range(count)]


###############################################################################
# Running the fuzz
###############################################################################


class Tally(object):
    """Every answer's status, the problems found, and the slowest exchange."""

    def __init__(self):
        self.lock = threading.Lock()
        self.statuses = collections.Counter()
        self.by_kind = collections.Counter()
        self.problems = []
        self.requests = 0
        self.slowest = 0.0

    def problem(self, c, text):
        with self.lock:
            self.problems.append("%s %r: %s" % (c.kind, c.data[:160], text))


def check(c, answer, tally):
    """The rules every answer obeys."""
    with tally.lock:
        tally.statuses[answer.status] += 1
        tally.by_kind[(c.kind, answer.status)] += 1
    if answer.status >= 500:
        tally.problem(c, "HTTP %d %r" % (answer.status, answer.body[:200]))
    extra = set(answer.headers) - HEADERS
    if extra:
        tally.problem(c, "unexpected headers %s" % sorted(extra))
    if c.head or not answer.body and answer.status == 200:
        return
    match = JSONP.match(answer.body)
    if match and answer.headers.get("content-type", "").startswith("application/javascript"):
        body = match.group(1)
    else:
        body = answer.body
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:
        tally.problem(c, "HTTP %d answered non-JSON %r" % (answer.status, answer.body[:200]))
        return
    if answer.status >= 400 and not (isinstance(data, dict) and isinstance(data.get("code"), int)
                                     and isinstance(data.get("status"), str) and data["status"]):
        tally.problem(c, "HTTP %d without code and status: %r" % (answer.status, answer.body[:200]))


def exchange(address, c, tally):
    """Send one case on a new connection and check what comes back within TIMEOUT."""
    started = time.time()
    try:
        with socket.create_connection(address, timeout=TIMEOUT) as sock:
            try:
                sock.sendall(c.data)
                if not c.early and c.answers == 1 and b"/check_event" not in c.data:
                    sock.shutdown(socket.SHUT_WR)      # a half-closed poller counts as gone: no answer
            except OSError:
                pass                                 # the server may answer and close before reading it all
            answers = read_answers(sock, c.answers, c.head)
    except socket.timeout:
        tally.problem(c, "no answer within %.0f s" % TIMEOUT)
        return
    except OSError as e:
        tally.problem(c, "connection failed: %s" % e)
        return
    took = time.time() - started
    with tally.lock:
        tally.requests += 1
        tally.slowest = max(tally.slowest, took)
    if not answers:
        tally.problem(c, "closed without an answer")
    for answer in answers:
        check(c, answer, tally)


def slow_loris(address, rng, tally, results):
    """A connection that never finishes its request: the server must answer 408 or close within its timeout."""
    style = rng.choice(["silent", "trickle head", "trickle body"])
    started = time.time()
    closed_after = None
    try:
        with socket.create_connection(address, timeout=TIMEOUT + REQUEST_TIMEOUT) as sock:
            if style == "trickle head":
                pieces = [b"GET /openqq/get_user_info HTTP/1.1\r\n"] + [b"X-%d: y\r\n" % i for i in range(100)]
            elif style == "trickle body":
                sock.sendall(b"POST /openqq/search_friend HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
                pieces = [b"a"] * 1000
            else:
                pieces = []
            sock.settimeout(0.3)
            data = b""
            for piece in pieces + [None] * 100:
                if time.time() - started > TIMEOUT + REQUEST_TIMEOUT:
                    break
                try:
                    if piece is not None:
                        sock.sendall(piece)
                    chunk = sock.recv(65536)
                    if not chunk:
                        closed_after = time.time() - started
                        break
                    data += chunk
                except socket.timeout:
                    continue
                except OSError:
                    closed_after = time.time() - started
                    break
    except OSError as e:
        tally.problem(case("slow-loris", style), "connection failed: %s" % e)
        return
    with tally.lock:
        tally.requests += 1
    results.append((style, closed_after, data[:12]))


def memory():
    """(resident kB, live pymalloc blocks) of this process, once the garbage is collected and glibc gave
    its free heap back (its per-thread arenas keep freed memory otherwise, which a leak test would count)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)), sys.getallocatedblocks()


class Capture(logging.Handler):
    """The webqq logger at debug level: how many records, and the ones that are errors or carry a traceback."""

    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.count = 0
        self.broken = []

    def emit(self, record):
        self.count += 1
        if record.exc_info or record.levelno >= logging.ERROR or "Traceback" in record.getMessage():
            self.broken.append(self.format(record))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ten_thousand_hostile_requests(tmp_path, capfd):
    capture = Capture()
    log = logging.getLogger("webqq")
    level = log.level
    log.addHandler(capture)
    # Bounded stores are kept small, so that they are full before the memory baseline is taken.
    sim = Simulator(world={"friends": 4, "groups": 2, "members": 5, "discusses": 1, "seed": 3}, poll_hold=0.5,
                    auto_scan=0.1, max_requests=50).start()
    client = webqq.Client(smartqq_base=sim.url, tmpdir=str(tmp_path), qr_check_interval=0.05, send_interval=0,
                          qrcode_display="none", http_timeout=5, poll_timeout=5, log_level="info")
    received, happened = set(), collections.Counter()
    client.on("receive_message", lambda msg: received.add(msg.content))
    client.on("all_event", lambda name, *args: happened.update([name]))
    plugin = client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}], request_timeout=REQUEST_TIMEOUT,
                         check_event_timeout=0.2, check_event_history_size=20, stop_delay=0.2)
    log.setLevel(logging.DEBUG)
    log.propagate = False       # pytest's own capture would hold every debug line: memory that isn't the server's
    injected, stop_injecting = [], threading.Event()
    try:
        client.start()
        assert client.wait_for_state("running", timeout=20)
        host, port = plugin.urls[0].split("//")[1].split(":")
        address = (host, int(port))
        fuzzer = Fuzzer(SEED, sim.world)
        tally, loris = Tally(), []
        friend = sim.world.friends[0]

        def inject():
            while not stop_injecting.wait(0.05):
                injected.append("fuzz-%d" % len(injected))
                sim.inject_friend_message(friend.uin, injected[-1])
        injector = threading.Thread(target=inject, name="test-injector")
        injector.start()

        slow_rng = random.Random(SEED + 1)

        def run(count):
            """count requests, the share of slow-loris ones among them running alongside."""
            slow = count * SLOW_LORIS // REQUESTS
            with ThreadPoolExecutor(30, thread_name_prefix="test-loris") as lorises:
                for _ in range(slow):
                    lorises.submit(slow_loris, address, slow_rng, tally, loris)
                with ThreadPoolExecutor(WORKERS, thread_name_prefix="test-fuzz") as pool:
                    list(pool.map(lambda c: exchange(address, c, tally), fuzzer.cases(count - slow)))

        started = time.time()
        run(WARMUP)             # the same mix and concurrency as what follows: the allocator's arenas fill up
        rss_before, blocks_before = memory()
        run(REQUESTS - WARMUP)
        rss_after, blocks_after = memory()
        seconds = time.time() - started
        stop_injecting.set()
        injector.join()
        assert wait_until(lambda: received >= set(injected), 10), sorted(set(injected) - received)[:5]

        closed = collections.Counter(style for style, after, _ in loris if after is not None)
        summary = ("fuzz: %d requests in %.1f s, statuses %s, slowest %.2f s, RSS %d -> %d kB, blocks %d -> %d, "
                   "slow-loris closed %s" % (tally.requests, seconds, dict(sorted(tally.statuses.items())),
                                             tally.slowest, rss_before, rss_after, blocks_before, blocks_after,
                                             dict(closed)))
        with capfd.disabled():
            print("\n" + summary)
        assert tally.problems == [], "%d problems: %s" % (len(tally.problems), "\n".join(tally.problems[:40]))
        assert tally.requests == REQUESTS
        assert [r for r in loris if r[1] is None or r[1] > REQUEST_TIMEOUT + 1.5] == []
        assert rss_after - rss_before < RSS_BOUND_KB and blocks_after - blocks_before < BLOCKS_BOUND
        assert client.state == "running" and happened["relogin"] == happened["stop"] == 0
        assert len(injected) > 20
    finally:
        stop_injecting.set()
        log.removeHandler(capture)
        log.setLevel(level)
        log.propagate = True
        client.stop()
        sim.stop()
    assert capture.count > REQUESTS and capture.broken == [], capture.broken[:5]
    assert "Traceback" not in capfd.readouterr().err
