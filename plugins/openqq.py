# -*- coding: utf-8 -*-
"""openqq: the Openqq HTTP API of Mojo-Webqq, with check_event, post_api and poll_api.

    client.load("openqq", listen=[{"host": "127.0.0.1", "port": 5000}],
                post_api="http://127.0.0.1:8000/post", access_token="s3cret")

Every route of the original answers with the original's JSON (key sets, types, codes, status
strings); docs/openqq.md lists the options, the routes and where we deliberately differ.

 1. Constants     options and their defaults, request-level codes
 2. Requests      Request, Response, ApiError; parameters from query, form, multipart, JSON
 3. Security      access token, auth callback, cross-site refusal, JSONP names, protected mode
 4. Event hub     check_event: bounded queue drained whole, long-poll, cursor mode
 5. Reporter      post_api: worker threads, bounded queue, retries, signature, reply/shutup
 6. Routes        Api: the Openqq routes against the Client contract
 7. Server        a TrackedHTTPServer per listen entry, keep-alive, TLS, connection cap
 8. Poller        the poll_api loop, following redirects into this server's own API
 9. Plugin        Openqq (the object call() returns) and call(client, **options)
"""

import base64
import collections
import email.parser
import email.policy
import hashlib
import hmac
import http.cookiejar
import ipaddress
import itertools
import json
import logging
import re
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from webqq import (Http, TrackedHTTPServer, TransportError, __version__, is_loopback, json_dumps, parse_listen, to_bool,
                   to_int)

###############################################################################
# 1. Constants
###############################################################################

# The events the original reports by default (post_event_list).
DEFAULT_EVENTS = ("login", "stop", "state_change", "input_qrcode", "new_group", "new_friend",
                  "new_group_member", "lose_group", "lose_friend", "lose_group_member")

# Every option with its default; docs/openqq.md explains each one.
OPTIONS = {
    "listen": None,                       # [{"host": "127.0.0.1", "port": 5000}]
    "access_token": None,
    "auth": None,
    "allow_insecure": False,
    "allow_origin": (),
    "tls_cert": None, "tls_key": None, "tls_ca": None, "tls_ciphers": None,
    "request_timeout": 60,
    "max_body_size": 1048576,
    "max_connections": 2000,
    "post_api": None,
    "post_event": True,
    "post_event_list": DEFAULT_EVENTS,
    "post_stdout": False,
    "post_secret": None,
    "post_timeout": 5,
    "post_retries": 6,
    "post_retry_backoff": 1.0,
    "post_queue_size": 1000,
    "post_workers": 4,
    "post_media_data": True,              # accepted for compatibility; unused, as in the original
    "check_event_list_max_size": 20,
    "check_event_timeout": 30,
    "check_event_history_size": 1000,
    "poll_api": None,
    "poll_interval": 5,
    "poll_timeout": 120,
    "stop_delay": 3,
}
# One line of help per option, for the commented webqq.ini (None: not settable from a file).
OPTION_HELP = {
    "listen": "addresses to serve on: JSON list of {host, port} or host:port text (default 127.0.0.1:5000)",
    "access_token": "require this token on every request (?access_token= or Authorization: Bearer)",
    "auth": None,
    "allow_insecure": "start on a non-loopback address without a token (not recommended)",
    "allow_origin": "browser origins allowed to call the API cross-site (* for any)",
    "tls_cert": "TLS certificate file for every listen entry",
    "tls_key": "TLS private key file",
    "tls_ca": "CA file: with it, client certificates are required",
    "tls_ciphers": "OpenSSL cipher list for TLS",
    "request_timeout": "seconds a request may take to arrive whole, and an idle connection may stay open",
    "max_body_size": "largest request body, in bytes",
    "max_connections": "open connections per listen address",
    "post_api": "URL that every message and listed event is POSTed to as JSON",
    "post_event": "false: report messages only, no events",
    "post_event_list": "events to report (comma-separated)",
    "post_stdout": "also print every report as one JSON line on standard output",
    "post_secret": "sign reports: X-Signature: sha1=<HMAC-SHA1 of the body with this key>",
    "post_timeout": "seconds to wait for one post_api answer",
    "post_retries": "retries of a report after a connection error or HTTP 502/503/504",
    "post_retry_backoff": "first retry delay in seconds; it doubles each time",
    "post_queue_size": "reports waiting for delivery at most (the oldest is dropped beyond)",
    "post_workers": "delivery threads",
    "post_media_data": "accepted and ignored, as in the original",
    "check_event_list_max_size": "events check_event keeps (the oldest is dropped beyond)",
    "check_event_timeout": "seconds a check_event long poll waits before answering []",
    "check_event_history_size": "events kept for cursor readers",
    "poll_api": "URL to GET forever while the client runs (reverse calls)",
    "poll_interval": "seconds between two poll_api requests",
    "poll_timeout": "seconds to wait for one poll_api answer",
    "stop_delay": "seconds between the answer of stop_client / relogin and the action",
}

MESSAGE_TYPES = frozenset(("friend_message", "group_message", "discuss_message", "sess_message"))
# Parameters that steer a request and are never search attributes.
RESERVED = frozenset(("datatype", "callback", "async", "client", "access_token", "cursor"))
# The 1.x names search_group still answers to (the original's Group AUTOLOAD).
GROUP_ALIASES = {"gname": "name", "gnumber": "uid", "gtype": "role"}

# Request-level codes. -6 is the original's auth failure, -7 design.md's "client not running";
# the others are ours, for requests the original answered with HTML or not at all.
AUTH_FAILED = -6
NOT_RUNNING = -7
NOT_FOUND = -8
BAD_REQUEST = -9
INTERNAL_ERROR = -10

CORS_METHODS = "OPTIONS, HEAD, GET, POST"
CORS_HEADERS = "X-Requested-With, X-Auth-Token, Content-Type, Content-Length, Authorization"
JSONP_NAME = re.compile(r"^[A-Za-z0-9_.$]{1,128}$")
QUERY_PAIR = re.compile(r"([?&;])([^=&;\s\"'#]*)(=?)([^&;\s\"'#]*)")


def to_list(value):
    """A list option given as a list, a tuple, or a comma/space separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item for item in re.split(r"[\s,]+", value) if item]
    return list(value)


def perl_true(value):
    """A request parameter's truth as the original reads it: "" and "0" are false."""
    return value is not None and value not in ("", "0")


def redact(text):
    """text with the value of every query parameter whose name, percent-decoded, mentions a token
    (access_token, %61ccess_token, ACCESS_TOKEN...) masked, for log lines."""
    def mask(match):
        sep, name, equals = match.group(1, 2, 3)
        if "token" not in unquote_to_bytes(name).decode("latin-1").lower():
            return match.group(0)
        return sep + (name + "=***" if equals else "***")     # no "=": an encoded one may hide the value
    return QUERY_PAIR.sub(mask, text)


###############################################################################
# 2. Requests
###############################################################################


class ApiError(Exception):
    """A request the API refuses: the HTTP status, the Openqq code and a readable status."""

    def __init__(self, http_status, code, status, headers=(), **extra):
        Exception.__init__(self, status)
        self.http_status = http_status
        self.body = dict(extra, code=code, status=status)
        self.headers = list(headers)

    def response(self):
        return Response(json_dumps(self.body).encode("utf-8"), self.http_status, self.headers)


def bad_request(status, http_status=400):
    return ApiError(http_status, BAD_REQUEST, status)


class Response(object):
    """What the API answers: body bytes, HTTP status, headers, and what to do if it can't be delivered.

    `wait_for` = (ready, seconds) is no answer yet: ask again once ready() is true or seconds passed.
    """

    __slots__ = ("body", "status", "headers", "content_type", "undelivered", "wait_for")

    def __init__(self, body, status=200, headers=(), content_type="application/json; charset=utf-8"):
        self.body = body
        self.status = status
        self.headers = list(headers)
        self.content_type = content_type
        self.undelivered = None
        self.wait_for = None


class Request(object):
    """One API call as the routes see it, whether it came over HTTP or from a poll_api redirect.

    `parkable`: a long-poll may answer wait_for instead of waiting on this thread (see Parker);
    `wait`: seconds it may still wait, when not the route's own timeout; `query` and `body`: as they
    came, for a proxy to pass on.
    """

    __slots__ = ("method", "path", "params", "headers", "scheme", "alive", "trusted", "parkable", "wait",
                 "query", "body")

    def __init__(self, method, path, params, headers=None, scheme="http", alive=None, trusted=False,
                 query="", body=b""):
        self.method = method
        self.path = path
        self.params = params
        self.headers = headers or {}
        self.scheme = scheme
        self.alive = alive or (lambda: True)
        self.trusted = trusted
        self.parkable = False
        self.wait = None
        self.query = query
        self.body = body

    def param(self, name):
        """The parameter's value (the first one if it was repeated), or None."""
        value = self.params.get(name)
        return value[0] if isinstance(value, tuple) else value


def unquote(raw, charset):
    """Percent-decode every byte of a query or form component, '+' read as a space."""
    data = unquote_to_bytes(raw.replace(b"+", b" "))
    try:
        return data.decode(charset)
    except UnicodeDecodeError:
        raise bad_request("parameters must be %s (percent-encoded or not)" % charset.upper())


def add_param(params, name, value):
    """Store a parameter; a repeated name keeps every value in a tuple."""
    if name in params:
        old = params[name]
        params[name] = (old if isinstance(old, tuple) else (old,)) + (value,)
    else:
        params[name] = value


def json_value(value):
    """A JSON body's value as parameter text: true/false as 1/0, lists joined with commas."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ",".join(json_value(v) for v in value)
    raise bad_request("JSON parameters must be strings, numbers, booleans or lists of those")


def header_param(header, name):
    """A parameter of a header value such as Content-Type's charset or boundary."""
    match = re.search(r";\s*%s=\"?([^\";]+)\"?" % name, header or "", re.I)
    return match.group(1).strip() if match else None


def parse_params(query, content_type, body):
    """Parameters of a request: the query pairs, then the body's (form, multipart or JSON)."""
    params = {}
    for piece in query.split(b"&"):
        if piece:
            name, _, value = piece.partition(b"=")
            add_param(params, unquote(name, "utf-8"), unquote(value, "utf-8"))
    if not body:
        return params
    mime = (content_type or "").split(";")[0].strip().lower()
    charset = header_param(content_type, "charset") or "utf-8"
    try:
        "".encode(charset)
    except (LookupError, ValueError):       # ValueError: the "undefined" codec, a NUL in the name
        raise bad_request("unknown charset %s" % charset[:40])
    if mime == "application/json" or (not mime and body.lstrip()[:1] == b"{"):
        try:
            data = json.loads(body.decode(charset))
        except (ValueError, RecursionError):    # RecursionError: arrays nested thousands deep
            raise bad_request("the body is not valid JSON in %s" % charset.upper())
        if not isinstance(data, dict):
            raise bad_request("a JSON body must be an object")
        for name, value in data.items():
            if value is not None:
                add_param(params, name, json_value(value))
    elif mime == "multipart/form-data":
        for name, value in multipart_pairs(content_type, body, charset):
            add_param(params, name, value)
    elif mime in ("application/x-www-form-urlencoded", ""):
        for piece in body.split(b"&"):
            if piece.strip():
                name, _, value = piece.strip().partition(b"=")
                add_param(params, unquote(name, charset), unquote(value, charset))
    return params


def multipart_pairs(content_type, body, charset):
    """(name, text) of each field of a multipart/form-data body."""
    head = ("Content-Type: %s\r\n\r\n" % content_type).encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise bad_request("a multipart body needs its boundary")
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        data = part.get_payload(decode=True) or b""
        try:
            yield str(name), data.decode(part.get_content_charset() or charset)
        except (ValueError, LookupError):
            raise bad_request("multipart field %s is not %s" % (str(name)[:40], charset.upper()))


###############################################################################
# 3. Security
###############################################################################


def points_into(url, servers, entries):
    """True when url points into the /openqq/ API of these servers (each with its listen entry)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.path.startswith("/openqq/"):
        return False
    host = (parts.hostname or "").lower()
    return any(server.port == port and (parts.scheme == "https") == (server.tls is not None)
               and (is_loopback(host) or host == entry["host"].lower())
               for server, entry in zip(servers, entries))


def url_origin(url):
    """scheme://host[:port] of a URL, lower-cased, or None."""
    try:
        parts = urlsplit(url or "")
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return "%s://%s" % (parts.scheme.lower(), parts.netloc.lower())


class Guard(object):
    """Who may call: the access token, the auth callback, and the browser cross-site rules."""

    def __init__(self, token, auth, allow_origin, log):
        self.token = token.encode("utf-8") if token else None
        self.auth = auth
        self.allow_origin = frozenset(o.rstrip("/").lower() for o in allow_origin)
        self.log = log

    def check(self, req):
        """Raise ApiError(403) unless req may go on."""
        if req.trusted:
            return
        if not self.site_ok(req):
            raise ApiError(403, AUTH_FAILED, "cross-site request refused")
        if self.token is not None and not self.token_ok(req):
            raise ApiError(403, AUTH_FAILED, "auth failure")
        if self.auth is not None:
            try:
                ok = self.auth(dict(req.params), req)
            except Exception as e:
                self.log.warning("openqq auth callback failed: %s", e)
                ok = False
            if not ok:
                raise ApiError(403, AUTH_FAILED, "auth failure")

    def token_ok(self, req):
        given = req.params.get("access_token")
        if given is None:
            scheme, _, value = req.headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() in ("bearer", "token"):
                given = value.strip()
        if not isinstance(given, str):
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self.token)   # JSON may hold lone surrogates

    def allowed(self, origin):
        return origin is not None and ("*" in self.allow_origin or origin in self.allow_origin)

    def site_ok(self, req):
        """False for what a browser marks cross-site, or sends with a foreign Origin, unless allowed;
        and, when no token guards the API, for a browser's request to a name that isn't localhost's:
        a page whose name was made to resolve to 127.0.0.1 (DNS rebinding) is same-origin to it."""
        if self.token is None and self.auth is None and self.from_browser(req) and not self.local_host(req):
            return False
        origin = req.headers.get("origin")
        if origin is not None:
            origin = origin.rstrip("/").lower()
            return origin == self.own_origin(req) or self.allowed(origin)
        if req.headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
            return self.allowed(url_origin(req.headers.get("referer")))
        return True

    @staticmethod
    def from_browser(req):
        return "sec-fetch-site" in req.headers or req.headers.get("user-agent", "").startswith("Mozilla/")

    def local_host(self, req):
        """True when the Host header is an IP address, localhost, absent, or the host of an allowed origin."""
        host = req.headers.get("host", "").strip().lower()
        name = re.sub(r":\d*$", "", host).strip("[]")
        if not name or name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name.split("%")[0])
            return True
        except ValueError:
            return self.allowed(url_origin("%s://%s" % (req.scheme, host)))

    @staticmethod
    def own_origin(req):
        return "%s://%s" % (req.scheme, req.headers.get("host", "").lower())

    def cors_headers(self, req, preflight=False):
        """The Access-Control-* headers for an allowed browser request."""
        origin = req.headers.get("origin")
        if "*" in self.allow_origin:
            origin = "*"
        elif origin is None or not (origin.rstrip("/").lower() == self.own_origin(req)
                                    or self.allowed(origin.rstrip("/").lower())):
            return []
        headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        if preflight:
            headers += [("Access-Control-Allow-Methods", CORS_METHODS),
                        ("Access-Control-Allow-Headers", CORS_HEADERS),
                        ("Access-Control-Max-Age", "600")]
        return headers


def check_protected(entries, token, auth, allow_insecure):
    """Protected mode: refuse a listen address beyond loopback when nothing guards it."""
    exposed = [e["host"] or "*" for e in entries if not is_loopback(e["host"], resolve=True)]
    if exposed and not token and auth is None and not allow_insecure:
        raise ValueError(
            "openqq refuses to listen on %s without access_token (protected mode): set "
            "access_token, listen on 127.0.0.1, or set allow_insecure=1 if a firewall or "
            "proxy guards the port" % ", ".join(exposed))


###############################################################################
# 4. Event hub
###############################################################################


class EventHub(object):
    """check_event's queue, bounded and drained whole, plus a numbered history for cursor readers."""

    def __init__(self, max_size, history_size):
        self.max_size = max_size
        self.cond = threading.Condition()
        self.queue = collections.deque()
        self.history = collections.deque(maxlen=max(history_size, max_size))
        self.seq = 0
        self.dropped = 0
        self.closed = False
        self.listeners = []         # called after every change (the parkers' wake-ups)

    def put(self, item):
        with self.cond:
            self.seq += 1
            self.history.append((self.seq, item))
            self.queue.append(item)
            self._trim()
            self._changed()

    def _changed(self):
        self.cond.notify_all()
        for listener in self.listeners:
            listener()

    def ready(self, cursor=None):
        """True when take() (cursor None) or read(cursor) would answer at once."""
        with self.cond:
            if self.closed:
                return True
            if cursor is None:
                return bool(self.queue)
            return self.seq > self._start(cursor)

    def _start(self, cursor):
        """Where a read from cursor begins: a cursor ahead of us (a restarted client) starts over."""
        return cursor if cursor <= self.seq else 0

    def _trim(self):
        while len(self.queue) > self.max_size:
            self.queue.popleft()
            self.dropped += 1

    def take(self, timeout, alive):
        """Every queued item, waiting up to timeout for one; [] on timeout, None if the caller left."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.queue:
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    return []
                self.cond.wait(left)
                if not alive():
                    return None
            if not alive():
                return None
            items = list(self.queue)
            self.queue.clear()
            return items

    def give_back(self, items):
        """Return items whose answer could not be delivered to the front of the queue."""
        with self.cond:
            self.queue.extendleft(reversed(items))
            self._trim()
            self._changed()

    def read(self, cursor, timeout, alive):
        """(seq, item) pairs after cursor, waiting up to timeout; a cursor ahead of us starts over."""
        deadline = time.monotonic() + timeout
        with self.cond:
            cursor = self._start(cursor)
            while self.seq <= cursor:
                left = deadline - time.monotonic()
                if self.closed or left <= 0 or not alive():
                    return []
                self.cond.wait(left)
            fresh = min(self.seq - cursor, len(self.history))     # the history's seqs are consecutive
            return list(itertools.islice(self.history, len(self.history) - fresh, None))

    def close(self):
        """Wake every waiting poller; they answer at once from now on."""
        with self.cond:
            self.closed = True
            self._changed()


def peer_alive(sock):
    """False once the peer has closed or reset the connection; reads nothing."""
    timeout = sock.gettimeout()
    try:
        sock.settimeout(0)
        # socket.socket.recv peeks at the TCP stream below the SSL layer; there a waiting
        # TLS alert record (type 21) is the close_notify of a client that hung up.
        data = socket.socket.recv(sock, 1, socket.MSG_PEEK)
        return data != b"" and not (data == b"\x15" and isinstance(sock, ssl.SSLSocket))
    except (BlockingIOError, ssl.SSLWantReadError):
        return True
    except (OSError, ValueError):
        return False
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass


###############################################################################
# 5. Reporter
###############################################################################

Report = collections.namedtuple("Report", "body post_type msg")


def describe(report):
    """A report as log lines name it: its post_type and message id, or "event" and the event."""
    if report.msg is not None:
        return "%s %s" % (report.post_type, report.msg.id)
    return "event %s" % json.loads(report.body.decode("utf-8")).get("event")


def outgoing(log):
    """The core's Http for post_api and poll_api: no cookies shared with the upstream, no redirects."""
    return Http(jar=http.cookiejar.CookieJar(), log=log, user_agent="webqq/%s" % __version__)




class Reporter(object):
    """post_api delivery: a queue per worker keyed by conversation, retries, signature, counters."""

    def __init__(self, client, log, url, opts):
        self.client = client
        self.log = log
        self.url = url
        self.secret = opts["post_secret"].encode("utf-8") if opts["post_secret"] else None
        self.timeout = opts["post_timeout"]
        self.retries = opts["post_retries"]
        self.backoff = opts["post_retry_backoff"]
        self.capacity = opts["post_queue_size"]
        self.http = outgoing(log)
        self.lock = threading.Lock()
        self.queues = [collections.deque() for _ in range(opts["post_workers"])]
        self.conds = [threading.Condition(self.lock) for _ in self.queues]
        self.pending = 0
        self.stopping = threading.Event()
        self.deadline = None
        self.counts = {"sent": 0, "retried": 0, "dropped": 0, "failed": 0}
        self.threads = [threading.Thread(target=self._work, args=(i,), name="openqq-post-%d" % i,
                                         daemon=True) for i in range(len(self.queues))]

    def start(self):
        for t in self.threads:
            t.start()

    def submit(self, payload, msg=None):
        """Queue one report; the oldest waiting report makes room when the queue is full."""
        key = payload.get("group_id") or payload.get("discuss_id") or (
            payload.get("sender_id") if payload.get("class") == "recv" else payload.get("receiver_id"))
        index = hash(str(key if msg is not None else "event")) % len(self.queues)
        report = Report(json_dumps(payload).encode("utf-8"), payload["post_type"], msg)
        with self.lock:
            if self.stopping.is_set():
                self.counts["dropped"] += 1
                return
            if self.pending >= self.capacity:
                longest = max(self.queues, key=len)
                lost = longest.popleft()
                self.pending -= 1
                self.counts["dropped"] += 1
                self.log.warning("post_api queue full (%d): dropped report %s", self.capacity, describe(lost))
            self.queues[index].append(report)
            self.pending += 1
            self.conds[index].notify()

    def counters(self):
        with self.lock:
            return dict(self.counts, queued=self.pending)

    def _work(self, index):
        queue, cond = self.queues[index], self.conds[index]
        while True:
            with self.lock:
                while not queue and not self.stopping.is_set():
                    cond.wait()
                if not queue or (self.deadline and time.monotonic() > self.deadline):
                    if queue:
                        self.log.warning("post_api stopped: dropped %d queued report(s): %s", len(queue),
                                         ", ".join(describe(r) for r in queue))
                    self.counts["dropped"] += len(queue)
                    self.pending -= len(queue)
                    queue.clear()
                    return
                report = queue.popleft()
                self.pending -= 1
            try:
                self._deliver(report)
            except Exception:
                self.log.exception("post_api report failed")

    def _deliver(self, report):
        headers = {"Content-Type": "application/json"}
        if self.secret is not None:
            headers["X-Signature"] = "sha1=" + hmac.new(self.secret, report.body, hashlib.sha1).hexdigest()
        attempt = 0
        while True:
            try:
                res = self.http.request("POST", self.url, data=report.body, headers=headers,
                                        timeout=self.timeout, follow=False)
                status, error, again = res.status, "HTTP %d" % res.status, res.status in (502, 503, 504)
            except TransportError as e:
                status, error, again = None, str(e), not e.timed_out
            if status is not None and 200 <= status < 300:
                with self.lock:
                    self.counts["sent"] += 1
                self._use_answer(report, res.headers.get("content-type", ""), res.body)
                return
            if not again or attempt >= self.retries or self.stopping.is_set():
                with self.lock:
                    self.counts["failed"] += 1
                self.log.warning("post_api report %s failed: %s", report.post_type, error)
                return
            delay = min(self.backoff * 2 ** attempt, 30)
            attempt += 1
            with self.lock:
                self.counts["retried"] += 1
            self.log.debug("post_api %s, retry %d in %.1fs", error, attempt, delay)
            if self.stopping.wait(delay):
                with self.lock:
                    self.counts["failed"] += 1
                return

    def _use_answer(self, report, content_type, body):
        """A 2xx JSON answer to a message report: reply to it, shut the group sender up."""
        if report.msg is None or not re.search("text/json|application/json", content_type, re.I):
            return
        try:
            answer = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self.log.warning("post_api answered invalid JSON; ignored")
            return
        if not isinstance(answer, dict):
            return
        msg, reply = report.msg, answer.get("reply")
        if report.post_type == "send_message" and answer.get("format", "text") != "text":
            return
        if isinstance(reply, (int, float)) and not isinstance(reply, bool):
            reply = str(reply)
        if reply == "" or (reply is not None and not isinstance(reply, str)):
            self.log.warning("post_api reply must be non-empty text; ignored")
        elif reply is not None:
            self.client.reply_message(msg, reply)
        if report.post_type == "receive_message" and msg.type == "group_message" \
                and _number(answer.get("shutup")) == 1:
            seconds = int(_number(answer.get("shutup_time")) or 60)
            if not self.client.shutup_group_member(msg.group, [msg.sender], seconds):
                self.log.warning("post_api shutup of %s failed", getattr(msg.sender, "id", "?"))

    def stop(self, drain):
        """Deliver what is queued for up to drain seconds (no more retries), then end the workers."""
        with self.lock:
            self.deadline = time.monotonic() + drain
            self.stopping.set()
            for cond in self.conds:
                cond.notify_all()
        others = [t for t in self.threads if t is not threading.current_thread()]
        for t in others:
            t.join(drain)
        self.http.abort()      # past the drain time: break the requests still in flight
        for t in others:
            t.join()


def _number(value):
    """A JSON value compared as a number, the way Perl's == does; None when it is no number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


###############################################################################
# 6. Routes
###############################################################################


def jsonable(value):
    """An event argument as JSON: model objects through to_json(), bytes as base64."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, bytes):
        return base64.encodebytes(value).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)


def json_list(objects, to_json):
    """json_dumps([to_json(o) for o in objects]) as bytes, one object at a time: never every dict at once."""
    return b"[%s]" % b",".join(json_dumps(to_json(o)).encode("utf-8") for o in objects)


def not_found(code, what):
    return {"code": code, "id": None, "status": "%s not found" % what}


class Api(object):
    """The Openqq routes: parameters in, the original's JSON out, against the Client contract."""

    # path: (methods, needs a running client, handler)
    ROUTES = {
        "/openqq/get_user_info": ("GET", True, "get_user_info"),
        "/openqq/get_friend_info": ("GET", True, "get_friend_info"),
        "/openqq/get_group_info": ("GET", True, "get_group_info"),
        "/openqq/get_group_basic_info": ("GET", True, "get_group_basic_info"),
        "/openqq/get_discuss_info": ("GET", True, "get_discuss_info"),
        "/openqq/search_friend": ("GET POST", True, "search_friend"),
        "/openqq/search_group": ("GET POST", True, "search_group"),
        "/openqq/send_friend_message": ("GET POST", True, "send_friend_message"),
        "/openqq/send_group_message": ("GET POST", True, "send_group_message"),
        "/openqq/send_discuss_message": ("GET POST", True, "send_discuss_message"),
        "/openqq/send_sess_message": ("GET POST", True, "send_sess_message"),
        "/openqq/shutup_group_member": ("GET POST", True, "shutup_group_member"),
        "/openqq/kick_group_member": ("GET POST", True, "kick_group_member"),
        "/openqq/check_event": ("GET POST", False, "check_event"),
        "/openqq/get_client_info": ("GET POST", False, "get_client_info"),
        "/openqq/stop_client": ("GET POST", False, "stop_client"),
        "/openqq/relogin": ("GET", False, "relogin"),
    }

    def __init__(self, plugin):
        self.plugin = plugin
        self.client = plugin.client
        self.contacts = plugin.client.contacts
        self.guard = plugin.guard
        self.log = plugin.log
        self.cache = {}
        self.cache_lock = threading.Lock()
        self.events_answer = (None, b"[]")     # the last cursor-mode answer: many readers ask the same

    def handle(self, req):
        """Answer one request; never raises."""
        callback = None
        try:
            self.guard.check(req)
            if req.method == "OPTIONS":
                return Response(b"", 200, self.guard.cors_headers(req, preflight=True))
            route = self.ROUTES.get(req.path) or self.mounted(req.path)
            method = "GET" if req.method == "HEAD" else req.method
            if route is None or method not in route[0].split():
                raise ApiError(403, NOT_FOUND, "api not found")
            if req.param("datatype") == "jsonp":
                callback = req.param("callback") or "jsoncallback%d" % time.time()
                if not JSONP_NAME.match(callback):
                    callback = None
                    raise bad_request("callback must match [A-Za-z0-9_.$]{1,128}")
            if route[1] and self.client.state != "running":
                raise self.not_running()
            result = (route[2] if callable(route[2]) else getattr(self, route[2]))(req)
            resp = result if isinstance(result, Response) else Response(
                result if isinstance(result, bytes) else json_dumps(result).encode("utf-8"))
        except ApiError as e:
            resp = e.response()
        except Exception:
            self.log.exception("openqq %s failed", req.path)
            resp = ApiError(500, INTERNAL_ERROR, "internal error").response()
        if callback is not None:
            resp.body = b"%s(%s)" % (callback.encode("ascii"), resp.body)
            resp.content_type = "application/javascript; charset=utf-8"
        resp.headers.extend(self.guard.cors_headers(req))
        return resp

    def mounted(self, path):
        """The route of a handler another plugin mounted on a prefix of path (Openqq.mount), or None."""
        for prefix, handler in self.plugin.mounts:
            if path.startswith(prefix):
                return ("GET POST", False, handler)
        return None

    def not_running(self):
        state = self.client.state
        return ApiError(503, NOT_RUNNING, "client not running", [("Retry-After", "3")], state=state)

    # -- info ------------------------------------------------------------------

    def cached(self, key, kind, build):
        """The JSON bytes build() makes, reused until contacts of that kind change; one thread builds,
        the others wait for its bytes (40,000 group members make 9 MB of JSON and take half a second)."""
        version = self.contacts.versions[kind]
        hit = self.cache.get(key)
        if hit is None or hit[0] != version:
            with self.cache_lock:
                hit = self.cache.get(key)
                if hit is None or hit[0] != version:
                    hit = self.cache[key] = (version, build())
        return hit[1]

    def get_user_info(self, req):
        return self.cached("user", "user", lambda: json_dumps(self.contacts.user.to_json()).encode("utf-8"))

    def get_friend_info(self, req):
        return self.cached("friends", "friend", lambda: json_list(self.contacts.friends(), lambda f: f.to_json()))

    def get_group_info(self, req):
        return self.cached("groups", "group", lambda: json_list(self.contacts.groups(), lambda g: g.to_json()))

    def get_group_basic_info(self, req):
        return self.cached("groups_basic", "group",
                           lambda: json_list(self.contacts.groups(), lambda g: g.to_json(members=False)))

    def get_discuss_info(self, req):
        return self.cached("discusses", "discuss", lambda: json_list(self.contacts.discusses(), lambda d: d.to_json()))

    # -- search ------------------------------------------------------------------

    def search(self, req, find, aliases=None):
        attrs = {}
        for name, value in req.params.items():
            if name in RESERVED:
                continue
            name = (aliases or {}).get(name, name)
            if isinstance(value, tuple) or not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", name):
                return {"code": 100, "status": "object not found"}
            attrs[name] = value
        found = find(**attrs) if attrs else []
        if not found:
            return {"code": 100, "status": "object not found"}
        return [obj.to_json() for obj in found]

    def search_friend(self, req):
        return self.search(req, self.contacts.search_friend)

    def search_group(self, req):
        def find(**attrs):
            groups = self.contacts.search_group(**attrs)
            for group in groups:
                self.client.ensure_members(group)
            return groups
        return self.search(req, find, GROUP_ALIASES)

    # -- sends -------------------------------------------------------------------

    def selectors(self, req, names, **renames):
        """The lookup attributes present in req: {attr: value}; None if one was repeated."""
        attrs = {}
        for name in names:
            value = req.params.get(name)
            if isinstance(value, tuple):
                return None
            if value is not None:
                attrs[renames.get(name, name)] = value
        return attrs

    def first(self, find, attrs, *args):
        """The original's lookup: the first object matching every attribute, or None."""
        if not attrs:
            return None
        found = find(*args, **attrs)
        return found[0] if found else None

    def send_friend_message(self, req):
        friend = self.first(self.contacts.search_friend,
                            self.selectors(req, ("id", "uid", "name", "displayname")))
        if friend is None:
            return not_found(100, "friend")
        return self.send(req, self.client.send_friend_message, friend)

    def send_group_message(self, req):
        group = self.first(self.contacts.search_group,
                           self.selectors(req, ("id", "uid", "name", "displayname")))
        if group is None:
            return not_found(101, "group")
        return self.send(req, self.client.send_group_message, group)

    def send_discuss_message(self, req):
        discuss = self.first(self.contacts.search_discuss, self.selectors(req, ("id",)))
        if discuss is None:
            return not_found(102, "discuss")
        return self.send(req, self.client.send_discuss_message, discuss)

    def send_sess_message(self, req):
        params = req.params
        if "group_id" in params or "group_uid" in params:
            group = self.first(self.contacts.search_group,
                               self.selectors(req, ("group_id", "group_uid"), group_id="id", group_uid="uid"))
            member = group and self.client.ensure_members(group) and self.first(
                self.contacts.search_group_member, self.selectors(req, ("id", "uid")), group)
            if member is None:
                return not_found(103, "group member")
        elif "discuss_id" in params:
            discuss = self.first(self.contacts.search_discuss,
                                 self.selectors(req, ("discuss_id",), discuss_id="id"))
            member = discuss and self.first(self.contacts.search_discuss_member,
                                            self.selectors(req, ("id", "uid")), discuss)
            if member is None:
                return not_found(104, "discuss member")
        else:
            return {"code": 105, "id": None, "status": "discuss member or group member  not found"}
        return self.send(req, self.client.send_sess_message, member)

    def send(self, req, send, target):
        """Enqueue content for target; answer at once (async) or with the final status."""
        content = req.param("content")
        if not content:
            return {"code": 106, "id": None, "status": "content missing"}
        if perl_true(req.param("async")):
            send(target, content, source="api")
            return {"code": 0, "status": "request already in execution"}
        done = self.plugin.waiter()
        try:
            msg = send(target, content, source="api", callback=lambda m: done.set())
            done.wait()
        finally:
            self.plugin.waiters.discard(done)
        if not msg.wait(0):
            raise self.not_running()
        return {"code": msg.code, "id": msg.id, "info": msg.info, "status": msg.msg}

    # -- group admin ---------------------------------------------------------------

    def admin_targets(self, req):
        """(group, members) of a shutup/kick request, or the original's error answer."""
        group = self.first(self.contacts.search_group,
                           self.selectors(req, ("group_id", "group_uid"), group_id="id", group_uid="uid"))
        if group is None:
            return {"code": 100, "status": "object not found"}, None
        self.client.ensure_members(group)
        kind = "id" if req.params.get("member_id") is not None else "uid"
        value = req.params.get("member_" + kind) or ""
        values = value if isinstance(value, tuple) else (value,)
        ids = [part.strip() for v in values for part in v.split(",") if part.strip()]
        if not ids:
            return {"code": 200, "status": "member id empty"}, None
        members = []
        for one in ids:
            member = self.first(self.contacts.search_group_member, {kind: one}, group)
            if member is None:
                return {"code": 100, "status": "member %s not found" % one}, None
            members.append(member)
        return group, members

    def shutup_group_member(self, req):
        minutes = req.param("time")
        group, members = self.admin_targets(req)
        if members is None:
            return group
        if not re.match(r"^\d+$", minutes or "") or int(minutes) < 1:
            return {"code": 400, "status": "shutup time missing or error"}
        ok = self.client.shutup_group_member(group, members, int(minutes) * 60)
        return {"code": 0, "status": "success"} if ok else {"code": 201, "status": "failure"}

    def kick_group_member(self, req):
        group, members = self.admin_targets(req)
        if members is None:
            return group
        ok = self.client.kick_group_member(group, members)
        return {"code": 0, "status": "success"} if ok else {"code": 201, "status": "failure"}

    # -- events and control -----------------------------------------------------------

    def check_event(self, req):
        hub, timeout = self.plugin.hub, self.plugin.opts["check_event_timeout"]
        cursor = req.param("cursor")
        start = None if cursor is None else to_int(cursor)
        if cursor is not None and (start is None or start < 0):
            raise bad_request("cursor must be a number >= 0")
        if req.wait is not None:
            timeout = req.wait
        elif req.parkable and not hub.ready(start):
            resp = Response(b"")
            resp.wait_for = (lambda: hub.ready(start), timeout)
            return resp
        if start is None:
            items = hub.take(timeout, req.alive) or []
            resp = Response(json_dumps(items).encode("utf-8"))
            if items:
                resp.undelivered = lambda: hub.give_back(items)
            return resp
        pairs = hub.read(start, timeout, req.alive)
        following = pairs[-1][0] if pairs else min(start, hub.seq)
        span = (pairs[0][0], following) if pairs else None      # the seqs are consecutive: span fixes the items
        if span is None or self.events_answer[0] != span:
            self.events_answer = (span, json_dumps([dict(item, cursor=seq) for seq, item in pairs]).encode("utf-8"))
        return Response(self.events_answer[1], headers=[("X-Cursor", str(following))])

    def get_client_info(self, req):
        info = dict(self.client.client_info(), code=0, status="success", state=self.client.state)
        info.update(self.plugin.counters())
        return info

    def control(self, what, action):
        info = self.client.client_info()
        delay = self.plugin.opts["stop_delay"]
        self.plugin.later("openqq-" + what, delay, action)
        return info, "success, client(%s) will %s in %g seconds" % (info["pid"], what, delay)

    def stop_client(self, req):
        info, status = self.control("stop", self.client.stop)
        return {"account": info["account"], "code": 0, "pid": info["pid"], "runtime": info["runtime"],
                "starttime": info["starttime"], "status": status}

    def relogin(self, req):
        info, status = self.control("relogin", self.client.relogin)
        return {"account": info["account"], "code": 0, "status": status}


###############################################################################
# 7. Server
###############################################################################


def send_gathered(sock, head, body):
    """sock.sendall(head + body) without building head + body: one system call for both if it can."""
    sent = sock.sendmsg([head, body])
    if sent < len(head):
        sock.sendall(head[sent:])
        sock.sendall(body)
    else:
        sock.sendall(memoryview(body)[sent - len(head):])


def kernel_timeouts(sock, seconds):
    """Make sock blocking, each receive and send bounded by seconds in the kernel (POSIX); False where
    that is not possible. A socket with a Python timeout polls before every call, and each wait gives
    up the GIL: under many connections, each taking it back costs more than the call itself."""
    if not hasattr(socket, "SO_RCVTIMEO") or not hasattr(sock, "sendmsg"):    # not on Windows
        return False
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.settimeout(None)
    except (OSError, struct.error):
        return False
    return True


class Handler(BaseHTTPRequestHandler):
    """One connection: reads requests, hands them to the Api, writes the answers; keep-alive."""

    protocol_version = "HTTP/1.1"
    server_version = "webqq/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True

    def setup(self):
        self.timeout = self.server.request_timeout
        if self.server.tls is not None:
            self.request.settimeout(self.timeout)
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
            self.server.track(self.request)
        BaseHTTPRequestHandler.setup(self)
        blocking = self.server.tls is None and kernel_timeouts(self.connection, self.timeout)
        self.socket_timeout = None if blocking else self.timeout     # the mode buffered() restores

    def finish(self):
        self.server.awaiting(self.connection, None)
        try:
            BaseHTTPRequestHandler.finish(self)
        finally:
            if self.server.tls is not None:
                self.request.close()

    def handle_one_request(self):
        self.server.awaiting(self.connection, self.timeout)    # the whole request must arrive in time
        BaseHTTPRequestHandler.handle_one_request(self)

    def parse_request(self):
        """http.server's, after the empty lines a client may send before a request (RFC 9112 2.2);
        a request line of blanks gets 400 instead of a silent close."""
        for _ in range(4):
            if self.raw_requestline not in (b"\r\n", b"\n"):
                break
            self.raw_requestline = self.rfile.readline(65537)
        if self.raw_requestline.strip() and len(self.raw_requestline) <= 65536:
            return BaseHTTPRequestHandler.parse_request(self)
        self.command = self.requestline = self.request_version = ""
        self.close_connection = True
        if self.raw_requestline:
            self.send_error(414 if len(self.raw_requestline) > 65536 else 400)
        return False

    def do_GET(self):
        try:
            req = self.read_request()
            resp = self.server.api.handle(req)
        except ApiError as e:
            self.close_connection = True     # the body may be unread: don't parse it as a request
            resp = e.response()
        if resp.wait_for is not None:
            if not self.buffered():
                self.park(req, *resp.wait_for)
                return
            req.parkable, req.trusted = False, True      # a next request is already here: wait on this thread
            resp = self.server.api.handle(req)
        self.send(resp)

    def buffered(self):
        """True when bytes of a next request already sit in this connection's read buffer."""
        self.connection.settimeout(0)
        try:
            return bool(self.rfile.peek(1))
        except OSError:
            return False
        finally:
            self.connection.settimeout(self.socket_timeout)

    def park(self, req, ready, timeout):
        """Leave req to the server's Parker: this thread ends and the connection waits without one."""
        entry = Parked(self, req, ready, timeout)
        with self.server.connections_lock:
            self.server.parking[self.connection] = entry
        self.close_connection = True

    do_POST = do_HEAD = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = do_GET

    def read_request(self):
        target = self.path
        if target.startswith(("http://", "https://")):
            target = target.split("/", 3)[3] if target.count("/") >= 3 else ""
            target = "/" + target
        path, _, query = target.partition("?")
        headers = self.header_dict()
        try:
            body = self.read_body(headers)
        finally:
            self.server.awaiting(self.connection, None)
        params = parse_params(query.partition("#")[0].encode("latin-1"), headers.get("content-type"), body)
        scheme = "https" if self.server.tls is not None else "http"
        connection = self.connection
        req = Request(self.command, path, params, headers, scheme, lambda: peer_alive(connection),
                      query=query.partition("#")[0], body=body)
        req.parkable = self.server.parker is not None
        return req

    FRAMING = ("content-length", "transfer-encoding")

    def header_dict(self):
        """The request's headers by lowercase name (the last of repeated ones); two different
        Content-Length or Transfer-Encoding values are refused: proxies may each believe another."""
        headers = {}
        for name, value in self.headers.items():
            key = name.lower()
            if key in self.FRAMING and headers.get(key, value) != value:
                raise bad_request("conflicting %s headers" % name)
            headers[key] = value
        return headers

    def read_body(self, headers):
        """The body after headers (header_dict()), as Content-Length or chunked framing says."""
        limit = self.server.max_body_size
        coding = headers.get("transfer-encoding", "").strip().lower()
        if coding and coding != "identity":
            if coding != "chunked":
                raise bad_request("unsupported Transfer-Encoding", 400)
            return self.read_chunked(limit)
        length = headers.get("content-length")
        if length is None:
            return b""
        size = to_int(length)
        if size is None or size < 0:
            raise bad_request("invalid Content-Length")
        if size > limit:
            raise bad_request("request body over %d bytes" % limit, 413)
        body = self.rfile.read(size) or b""     # None: the kernel timeout ended the wait
        if len(body) < size:
            raise bad_request("request body shorter than its Content-Length")
        return body

    def read_chunked(self, limit):
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(1026)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:                    # read(-1) would wait for the end of the connection
                raise bad_request("invalid chunked body")
            if size == 0:
                break
            total += size
            if total > limit:
                raise bad_request("request body over %d bytes" % limit, 413)
            chunks.append(self.rfile.read(size) or b"")
            self.rfile.readline(3)
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(chunks)

    def answer(self, resp):
        """(head, body): the bytes this connection sends for resp."""
        body = b"" if self.command == "HEAD" else resp.body
        lines = ["HTTP/1.1 %d %s" % (resp.status, self.responses.get(resp.status, ("",))[0]),
                 "Server: " + self.server_version,
                 "Date: " + self.server.date(),
                 "Content-Type: " + resp.content_type,
                 "Content-Length: %d" % len(resp.body),
                 "X-Content-Type-Options: nosniff"]
        lines.extend("%s: %s" % pair for pair in resp.headers)
        if self.close_connection:
            lines.append("Connection: close")
        elif getattr(self, "request_version", "") == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"), body

    def send(self, resp):
        """Write resp; if the caller is gone, let it take its items back."""
        head, body = self.answer(resp)
        try:
            if len(body) <= 65536:
                self.wfile.write(head + body)
            elif self.server.tls is None and hasattr(self.connection, "sendmsg"):
                send_gathered(self.connection, head, body)
            else:                           # a large body is not copied behind the head
                self.wfile.write(head)
                self.wfile.write(body)
        except OSError:
            self.close_connection = True
            if resp.undelivered is not None:
                resp.undelivered()
            return
        self.log_request(resp.status, len(body))

    # http.server answers an unknown method 501 and an HTTP/2+ request line 505: both are the
    # caller's mistakes, not failures of this server, so they get a 4xx.
    REFUSALS = {501: 405, 505: 400}

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, headers too long...) as JSON."""
        self.server.awaiting(self.connection, None)
        self.close_connection = True
        status = message or self.responses.get(code, ("error",))[0]
        error = bad_request(status, self.REFUSALS.get(code, code))
        if code == 501:
            error.headers.append(("Allow", "OPTIONS, HEAD, GET, POST"))
        self.send(error.response())

    def log_message(self, fmt, *args):
        if self.server.log.isEnabledFor(logging.DEBUG):     # formatting every request line costs
            self.server.log.debug("openqq %s %s", self.address_string(), redact(fmt % args))


class Server(TrackedHTTPServer):
    """One listen address: a thread per connection, capped in number; optional TLS."""

    name = "openqq"
    request_queue_size = 1024

    def __init__(self, entry, api, opts, log, hub=None):
        """hub: the EventHub whose check_event long-polls wait parked (without a thread of their own)."""
        host = entry["host"]
        self.api = api
        self.log = log
        self.tls = tls_context(entry) if entry.get("tls") else None
        self.request_timeout = opts["request_timeout"]
        self.max_body_size = opts["max_body_size"]
        self.max_connections = opts["max_connections"]
        self.deadlines = {}     # socket -> when its request must have arrived whole (slow-loris guard)
        self._date = (0, "")
        TrackedHTTPServer.__init__(self, (host, entry["port"]), Handler)
        self.parker = Parker(self, hub) if hub is not None and self.tls is None else None
        self.parking = {}       # socket -> Parked, until its connection thread lets go of the socket

    def start(self):
        TrackedHTTPServer.start(self)
        if self.parker is not None:
            self.parker.thread.start()
        return self

    @property
    def url(self):
        host = self.server_address[0]
        host = "[%s]" % host if ":" in host else host
        return "%s://%s:%d" % ("https" if self.tls else "http", host, self.port)

    def date(self):
        """The Date header, formatted once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def process_request(self, request, client_address):
        with self.connections_lock:
            parked = len(self.parker) if self.parker is not None else 0
            full = len(self.connections) + parked >= self.max_connections
        if full:
            self.refuse(request)
        else:
            self.spawn(self.process_request_thread, request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            entry = self.parking.pop(request, None)
            if entry is not None:       # counted as parked from now on, no longer as this thread's
                self.connections.pop(threading.current_thread(), None)
                self.parker.park(entry)
        if entry is None:
            TrackedHTTPServer.shutdown_request(self, request)

    def resume(self, request, client_address, rest=b"", undelivered=None):
        """Serve a connection the parker held on a thread again, once the rest of its answer is written."""
        self.spawn(self.resume_thread, request, client_address, rest, undelivered)

    def resume_thread(self, request, client_address, rest, undelivered):
        try:
            request.settimeout(self.request_timeout)
            request.sendall(rest)
        except OSError:
            if undelivered is not None:
                undelivered()
            TrackedHTTPServer.shutdown_request(self, request)
            return
        self.process_request_thread(request, client_address)

    def awaiting(self, sock, timeout):
        """The request on sock must arrive within timeout seconds from now; None: it has."""
        with self.connections_lock:
            if timeout is None:
                self.deadlines.pop(sock, None)
            else:
                self.deadlines[sock] = time.monotonic() + timeout

    def service_actions(self):
        """Cut connections whose request did not arrive whole in time: a trickle resets no timeout."""
        now = time.monotonic()
        with self.connections_lock:
            late = [sock for sock, deadline in self.deadlines.items() if deadline <= now]
            for sock in late:
                del self.deadlines[sock]
        for sock in late:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)   # below TLS: its thread may be reading
            except OSError:
                pass

    def refuse(self, request):
        if self.tls is None:
            body = json_dumps({"code": BAD_REQUEST, "status": "too many connections"}).encode()
            try:
                request.settimeout(0)
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            except OSError:
                pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (OSError, ssl.SSLError, ValueError)):
            self.log.debug("openqq connection from %s ended: %s", client_address[0], error)
        else:
            self.log.exception("openqq connection from %s failed", client_address[0])

    def server_close(self):
        TrackedHTTPServer.server_close(self)
        if self.parker is not None:
            self.parker.stop()


class Parked(object):
    """A connection the Parker holds: waiting for its check_event answer (req), or idle (req None)."""

    __slots__ = ("sock", "address", "handler", "req", "ready", "deadline", "keep_alive")

    def __init__(self, handler, req, ready, timeout):
        self.sock, self.address, self.handler = handler.connection, handler.client_address, handler
        self.req, self.ready = req, ready
        self.deadline = time.monotonic() + timeout
        self.keep_alive = not handler.close_connection


class Parker(object):
    """check_event long-polls waiting without a thread each, answered together by one thread.

    A waiting thread costs little until the event comes; then waking a thousand of them at once
    keeps the interpreter lock busy for most of a second, while one thread writes a thousand
    answers in milliseconds. After its answer a connection stays here, idle, until its next
    request arrives, which gets a thread again. TLS connections wait on their own threads.
    """

    def __init__(self, server, hub):
        self.server = server
        self.hub = hub
        self.selector = selectors.DefaultSelector()
        self.wakeup, self.waker = socket.socketpair()
        for sock in (self.wakeup, self.waker):
            sock.setblocking(False)
        self.selector.register(self.wakeup, selectors.EVENT_READ)
        self.lock = threading.Lock()
        self.arriving = []
        self.parked = {}            # socket -> Parked; only the parker's thread changes it
        self.news = False           # the hub changed: some waiting poller may be ready
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="openqq-park-%d" % server.port, daemon=True)
        hub.listeners.append(self.notice)

    def __len__(self):
        return len(self.parked) + len(self.arriving)

    def park(self, entry):
        with self.lock:
            self.arriving.append(entry)
        self.wake()

    def notice(self):
        with self.lock:
            self.news = True
        self.wake()

    def wake(self):
        try:
            self.waker.send(b"\0")
        except OSError:             # its buffer is full (a wake-up is pending anyway), or it is closed
            pass

    def run(self):
        while True:
            with self.lock:
                if self.stopping:
                    return
                arriving, self.arriving = self.arriving, []
                news, self.news = self.news or bool(arriving), False
            for entry in arriving:
                entry.sock.settimeout(0)
                self.parked[entry.sock] = entry
                self.selector.register(entry.sock, selectors.EVENT_READ, entry)
            now = time.monotonic()
            for entry in [e for e in self.parked.values()
                          if e.deadline <= now or (news and e.req is not None and e.ready())]:
                try:
                    self.due(entry)
                except Exception:
                    self.server.log.exception("openqq parked request failed")
                    self.drop(entry)
            soonest = min([e.deadline for e in self.parked.values()] or [now + 60])
            for key, _ in self.selector.select(max(0.0, soonest - time.monotonic())):
                if key.data is None:
                    while self.wakeup.recv(4096) == 4096:
                        pass
                elif key.data.sock in self.parked:
                    self.readable(key.data)

    def due(self, entry):
        """Answer a waiting entry (ready, or its time is up); close an idle one whose time is up."""
        if entry.req is None:
            self.drop(entry)                # as a connection thread's read times out
            return
        req, entry.req = entry.req, None
        req.parkable, req.wait, req.trusted = False, 0, True    # it passed the guard when it came
        resp = self.server.api.handle(req)
        handler = entry.handler
        handler.close_connection = not entry.keep_alive
        data = b"".join(handler.answer(resp))
        try:
            sent = entry.sock.send(data)
        except OSError:
            if resp.undelivered is not None:
                resp.undelivered()
            self.drop(entry)
            return
        handler.log_request(resp.status, len(data))
        if sent < len(data):
            self.release(entry, data[sent:], resp.undelivered)
        elif not entry.keep_alive:
            self.drop(entry)
        else:
            entry.deadline = time.monotonic() + self.server.request_timeout

    def readable(self, entry):
        try:
            data = entry.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(entry)                # the client hung up: nothing was taken for it
        elif entry.req is not None:
            entry.deadline = 0              # a request behind the long-poll: answer it now, then serve on
        else:
            self.release(entry)

    def release(self, entry, rest=b"", undelivered=None):
        """Give the connection back to a thread of the server."""
        self.selector.unregister(entry.sock)
        del self.parked[entry.sock]
        self.server.resume(entry.sock, entry.address, rest, undelivered)

    def drop(self, entry):
        if self.parked.pop(entry.sock, None) is not None:
            self.selector.unregister(entry.sock)
        TrackedHTTPServer.shutdown_request(self.server, entry.sock)

    def stop(self):
        """End the thread and close every connection held here."""
        with self.lock:
            self.stopping = True
        self.wake()
        if self.thread.ident is not None and self.thread is not threading.current_thread():
            self.thread.join()
        for entry in list(self.parked.values()) + self.arriving:
            TrackedHTTPServer.shutdown_request(self.server, entry.sock)
        self.parked.clear()
        self.arriving = []
        self.selector.close()
        self.wakeup.close()
        self.waker.close()
        if self.notice in self.hub.listeners:
            self.hub.listeners.remove(self.notice)


def tls_context(entry):
    """The server-side SSLContext of a TLS listen entry; a CA file makes client certificates required."""
    if not entry.get("tls_cert") or not entry.get("tls_key"):
        raise ValueError("openqq: TLS on %s:%s needs tls_cert and tls_key" % (entry["host"], entry["port"]))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(entry["tls_cert"], entry["tls_key"])
    if entry.get("tls_ca"):
        ctx.load_verify_locations(entry["tls_ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED
    if entry.get("tls_ciphers"):
        ctx.set_ciphers(entry["tls_ciphers"])
    return ctx


def listen_entries(opts):
    """The listen option as a list of {host, port, tls, tls_*} entries."""
    value = opts["listen"]
    if value is None:
        value = [{"host": "127.0.0.1", "port": 5000}]
    elif isinstance(value, dict):
        value = [value]
    elif isinstance(value, (str, int)):
        value = to_list(str(value))
    entries = []
    for item in value:
        entry = dict(parse_listen(item) if isinstance(item, str) else item)
        for key in ("tls_cert", "tls_key", "tls_ca", "tls_ciphers"):
            entry.setdefault(key, opts[key])
        entry["tls"] = to_bool(entry.get("tls", entry.get("tls_cert") is not None))
        entry["host"] = str(entry.get("host", "127.0.0.1")).strip("[]")
        port = to_int(entry.get("port", 443 if entry["tls"] else 5000))
        if port is None or not 0 <= port <= 65535:
            raise ValueError("openqq: invalid listen port %r" % entry.get("port"))
        entry["port"] = port
        entries.append(entry)
    return entries


###############################################################################
# 8. Poller
###############################################################################


def call_url(api, url):
    """GET one of api's own URLs in-process, as a trusted caller."""
    parts = urlsplit(url)
    params = parse_params(parts.query.encode("utf-8"), None, b"")
    return api.handle(Request("GET", parts.path, params, trusted=True, query=parts.query))


class Poller(object):
    """poll_api: GET it forever, poll_interval apart; a redirect into our own API is called in-process.

    plugin (the Openqq plugin, or the controller) has log, opts, stopped, api, owns(url) and
    polling(): whether to poll now."""

    def __init__(self, plugin, url, name="openqq-poll"):
        self.plugin = plugin
        self.url = url
        self.http = outgoing(plugin.log)
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)

    def run(self):
        stopped = self.plugin.stopped
        while not stopped.is_set():
            if self.plugin.polling():
                try:
                    self.poll()
                except Exception:
                    self.plugin.log.exception("poll_api failed")
            stopped.wait(self.plugin.opts["poll_interval"])

    def poll(self):
        log = self.plugin.log
        try:
            res = self.http.request("GET", self.url, timeout=self.plugin.opts["poll_timeout"], follow=False)
        except TransportError as e:
            if not self.plugin.stopped.is_set():
                log.warning("poll_api %s failed: %s", redact(self.url), e)
            return
        status = res.status
        if status in (301, 302, 303, 307, 308) and res.headers.get("location"):
            target = urljoin(self.url, res.headers["location"])
            if not self.plugin.owns(target):
                log.warning("poll_api redirect to %s not followed: not this server's API", redact(target))
                return
            resp = call_url(self.plugin.api, target)
            log.debug("poll_api called %s: %d %s", redact(target), resp.status, resp.body[:200])
        elif not 200 <= status < 300:
            log.warning("poll_api %s answered HTTP %d", redact(self.url), status)

    def stop(self):
        """Wait for the thread (the plugin's stopped is set), cutting a poll in flight."""
        while self.thread.is_alive() and self.thread is not threading.current_thread():
            self.http.abort()       # again: a poll may have begun just after the first abort
            self.thread.join(0.2)


###############################################################################
# 9. Plugin
###############################################################################


class Openqq(object):
    """The plugin: owns the servers, the check_event hub, the reporter, the poller; stop() ends them."""

    def __init__(self, client, options):
        self.client = client
        self.log = client.log.getChild("openqq")
        self.opts = self.read_options(options)
        self.entries = listen_entries(self.opts)
        check_protected(self.entries, self.opts["access_token"], self.opts["auth"],
                        self.opts["allow_insecure"])
        self.guard = Guard(self.opts["access_token"], self.opts["auth"], self.opts["allow_origin"], self.log)
        self.hub = EventHub(self.opts["check_event_list_max_size"], self.opts["check_event_history_size"])
        self.events = frozenset(self.opts["post_event_list"]) if self.opts["post_event"] else frozenset()
        self.reporter = Reporter(client, self.log, self.opts["post_api"], self.opts) \
            if self.opts["post_api"] else None
        self.poller = Poller(self, self.opts["poll_api"]) if self.opts["poll_api"] else None
        self.api = Api(self)
        self.servers = []
        self.mounts = []  # (path prefix, handler) pairs of other plugins: mount()
        self.threads = set()
        self.waiters = set()
        self.stopped = threading.Event()
        self.stop_lock = threading.Lock()
        self.stdout_lock = threading.Lock()

    def read_options(self, options):
        if isinstance(options.get("data"), dict):       # the Perl form: load("Openqq", data => {...})
            options = dict(options.pop("data"), **options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            self.log.warning("openqq: unknown option(s) ignored: %s", ", ".join(unknown))
        opts = dict(OPTIONS, **{k: v for k, v in options.items() if k in OPTIONS})
        for name in ("allow_insecure", "post_event", "post_stdout"):
            opts[name] = to_bool(opts[name])
        for name in ("request_timeout", "post_timeout", "post_retry_backoff", "check_event_timeout",
                     "poll_interval", "poll_timeout", "stop_delay"):
            try:
                opts[name] = float(opts[name])
            except (TypeError, ValueError):
                raise ValueError("openqq: option %s must be a number of seconds" % name)
        for name in ("max_body_size", "max_connections", "post_retries", "post_queue_size",
                     "post_workers", "check_event_list_max_size", "check_event_history_size"):
            value = to_int(opts[name])
            if value is None or value < 0:
                raise ValueError("openqq: option %s must be a whole number" % name)
            opts[name] = value
        opts["check_event_list_max_size"] = opts["check_event_list_max_size"] or 20   # as the original
        opts["poll_interval"] = opts["poll_interval"] or 5
        opts["post_workers"] = max(1, opts["post_workers"])
        opts["post_queue_size"] = max(1, opts["post_queue_size"])
        opts["post_event_list"] = to_list(opts["post_event_list"])
        opts["allow_origin"] = to_list(opts["allow_origin"])
        for name in ("access_token", "post_secret", "post_api", "poll_api"):
            opts[name] = str(opts[name]) if opts[name] not in (None, "") else None
        if opts["auth"] is not None and not callable(opts["auth"]):
            raise ValueError("openqq: option auth must be a function(params, request)")
        return opts

    def start(self):
        try:
            for entry in self.entries:
                self.servers.append(Server(entry, self.api, self.opts, self.log, hub=self.hub))
        except Exception:
            for server in self.servers:
                server.server_close()
            raise
        for server in self.servers:
            server.start()
        if self.reporter is not None:
            self.reporter.start()
        if self.poller is not None:
            self.poller.thread.start()
        self.client.on("all_event", self.on_event)
        self.log.info("openqq listening on %s", ", ".join(s.url for s in self.servers))
        return self

    def mount(self, prefix, handler):
        """Serve the paths under prefix with handler(req), behind the same token and cross-site rules.

        handler returns a Response or JSON-able data, or raises ApiError; it runs on the connection's thread.
        """
        self.mounts.append((prefix, handler))

    @property
    def urls(self):
        return [server.url for server in self.servers]

    # -- reports -------------------------------------------------------------------

    def on_event(self, name, *args):
        """Every client event: messages always reported and queued, other events as listed."""
        if name in ("receive_message", "send_message"):
            msg = args[0]
            if msg.type not in MESSAGE_TYPES:
                return
            payload = dict(msg.to_json(), post_type=name)
            self.hub.put(payload)
            self.report(payload, msg)
        elif name in self.events:
            if name == "input_qrcode":
                params = [args[0], base64.encodebytes(args[1]).decode("ascii")]
            else:
                params = jsonable(list(args))
            payload = {"post_type": "event", "event": name, "params": params}
            if name.startswith(("new_", "lose_")) or name.endswith("_property_change"):
                self.hub.put(payload)
            self.report(payload)

    def report(self, payload, msg=None):
        if self.opts["post_stdout"]:
            with self.stdout_lock:
                try:
                    sys.stdout.write(json_dumps(payload) + "\n")
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass
        if self.reporter is not None:
            self.reporter.submit(payload, msg)

    def counters(self):
        """The figures get_client_info adds: post_api_* and check_event_dropped."""
        figures = {"check_event_dropped": self.hub.dropped}
        if self.reporter is not None:
            counts = self.reporter.counters()
            figures.update(("post_api_" + k, v) for k, v in counts.items())
        return figures

    # -- helpers for the routes and the poller --------------------------------------------

    def waiter(self):
        """An Event a sync send waits on; stop() sets them all."""
        done = threading.Event()
        self.waiters.add(done)
        if self.stopped.is_set():
            done.set()
        return done

    def later(self, name, delay, action):
        """Run action on its own thread after delay seconds, unless the plugin stops first."""
        def run():
            try:
                if not self.stopped.wait(delay):
                    action()
            finally:
                self.threads.discard(threading.current_thread())
        t = threading.Thread(target=run, name=name, daemon=True)
        self.threads.add(t)
        t.start()

    def owns(self, url):
        """True when url points into this plugin's /openqq/ API."""
        return points_into(url, self.servers, self.entries)

    def polling(self):
        """poll_api is polled while the client is logged in."""
        return self.client.state == "running"

    def stop(self):
        """End every thread of the plugin; returns when they have ended."""
        with self.stop_lock:
            if self.stopped.is_set():
                return
            self.stopped.set()
        self.client.off("all_event", self.on_event)
        self.hub.close()
        for done in list(self.waiters):
            done.set()
        for server in self.servers:
            server.close()
        if self.poller is not None:
            self.poller.stop()
        if self.reporter is not None:
            self.reporter.stop(self.opts["post_timeout"])
        for t in list(self.threads):
            if t is not threading.current_thread():
                t.join()
        self.log.debug("openqq stopped")


def call(client, **options):
    """The plugin entry point: start the Openqq API for client; returns the plugin (it has stop())."""
    return Openqq(client, options).start()
