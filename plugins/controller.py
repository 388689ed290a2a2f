# -*- coding: utf-8 -*-
"""controller: the multi-account Controller API, one webqq process per account behind one port.

    python webqq.py controller --listen 127.0.0.1:4000 --post-api http://127.0.0.1:8000/post

    curl 'http://127.0.0.1:4000/openqq/start_client?client=alice'
    curl 'http://127.0.0.1:4000/openqq/send_friend_message?client=alice&uid=123&content=hi'

The routes and answers are those of Mojo-Webqq's Controller (docs/controller.md), minus its
bugs: clients are child processes on ports the controller reserves, restarted when they crash,
kept in a JSON registry and adopted again when the controller itself restarts.

 1. Constants     options, answer codes, which start_client parameters go where
 2. Children      Child: one client process, its registry record, its INI file, its API
 3. Routes        Api: start_client, stop_client, check_client, get_qrcode and the proxy
 4. Server        webqq's ApiServer under the controller's name
 5. Controller    Controller(**options): registry, ports, supervision, poll_api, start/stop
 6. CLI           main(argv), for `python webqq.py controller`
"""

import argparse
import collections
import configparser
import http.client
import io
import json
import logging
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import webqq
from webqq import (ENV_PREFIX, ApiError, ApiServer, ArgumentParser, Client, Guard, Poller, Response, atomic_write,
                   bad_request, check_listen, check_log_level, check_protected, check_url, configure_logging,
                   json_dumps, listen_entries, non_negative, parse_listen, pid_alive, points_into, read_config,
                   read_options, read_pid, remove_file, save_file, serve, to_bool, to_list, whole)

###############################################################################
# 1. Constants
###############################################################################

# Answer codes of the original Controller; NOT_REACHABLE is ours (the original answered an
# empty HTTP 200 when a client did not answer).
CLIENT_ERROR, NO_PORT, SPAWN_FAILED, MAX_CLIENTS, NOT_REACHABLE, API_NOT_FOUND = 1, 2, 3, 5, 6, -1

# Client options the controller decides for every child; a start_client parameter can't change them.
OWN_CLIENT_OPTIONS = frozenset(("account", "controller_pid", "controller_pid_path", "controller_grace"))
# Openqq options a start_client parameter may set for its client.
CLIENT_OPENQQ_OPTIONS = frozenset(("post_api", "post_event", "post_event_list", "post_secret", "post_media_data",
                                   "poll_api", "poll_interval", "check_event_list_max_size",
                                   "check_event_timeout"))
# Parameters that steer a controller request and never reach a client.
STEERING = frozenset(("client", "access_token"))
NAME = re.compile(r"^(?!\.)[\w@.\-]{1,64}$")

# Request headers that belong to one hop (or to the browser check the controller already made).
HOP_HEADERS = frozenset(("connection", "keep-alive", "proxy-authorization", "proxy-connection", "te",
                         "trailer", "transfer-encoding", "upgrade", "host", "content-length",
                         "authorization", "origin", "sec-fetch-site", "sec-fetch-mode",
                         "sec-fetch-dest", "sec-fetch-user", "expect"))
# Response headers the controller's own server writes itself.
OWN_RESPONSE_HEADERS = frozenset(("connection", "keep-alive", "transfer-encoding", "content-length",
                                  "content-type", "date", "server", "x-content-type-options"))

RESTART_DELAY_MAX = 60.0   # seconds: the longest wait before restarting a crashed client
STABLE_AFTER = 60.0        # seconds: a client up this long has its crash count forgotten
FAILED_STARTS_MAX = 5      # starts in a row that never answered (port taken, bad option) before giving up


# option: (default, one line of help[, check]), in --help order; help None: not a flag (a Python function).
OPTIONS = collections.OrderedDict([
    ("listen", ([{"host": "127.0.0.1", "port": 4000}], "API address(es) of the controller", check_listen)),
    ("access_token", (None, "require this token on every request (query access_token= or Bearer)")),
    ("auth", (None, None)),      # a function(params, request) -> bool deciding every request
    ("allow_insecure", (False, "listen beyond loopback without an access_token", to_bool)),
    ("allow_origin", ((), "browser origins allowed to call the API")),
    ("tmpdir", (None, "folder for the registry, pid, INI and client files (default: the system temp folder)")),
    ("pid_path", (None, "pid file (default: tmpdir/mojo_webqq_controller_process.pid)")),
    ("backend_path", (None, "registry (default: tmpdir/mojo_webqq_controller_backend.json)")),
    ("backend_start_port", (5000, "first port tried for a client's Openqq API", whole())),
    ("max_clients", (100, "how many clients may run at once", whole())),
    ("post_api", (None, "every client's post_api unless start_client gives one (client=NAME added)", check_url)),
    ("poll_api", (None, "GET this URL in a loop; a redirect into this API is carried out", check_url)),
    ("poll_interval", (5.0, "seconds between two poll_api requests", non_negative)),
    ("poll_timeout", (120.0, "seconds to wait for one poll_api answer", non_negative)),
    ("check_interval", (1.0, "seconds between two checks of the clients", non_negative)),
    ("start_timeout", (30.0, "seconds a started client has to answer on its port before it is restarted",
                       non_negative)),
    ("restart_delay", (1.0, "seconds before the first restart of a crashed client (doubles, up to 60)", non_negative)),
    ("stop_timeout", (10.0, "seconds a stopping client has before it is killed", non_negative)),
    ("client_grace", (10.0, "seconds clients wait for a restarting controller before they stop", non_negative)),
    ("proxy_timeout", (120.0, "seconds to wait for a client's answer to a proxied request", non_negative)),
    ("log_level", ("info", "debug info msg warn error fatal (also every client's, unless given)",
                   check_log_level)),
    ("log_path", (None, "log file, also every client's unless given (default: standard error)")),
])


def with_client(url, name):
    """url with client=name in its query (replacing one that is there)."""
    parts = urlsplit(url)
    pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "client"]
    return urlunsplit(parts._replace(query=urlencode(pairs + [("client", name)])))


def strip_query(query, names):
    """A raw query string without the pairs called one of names, the rest byte for byte."""
    return "&".join(piece for piece in query.split("&")
                    if piece and unquote_plus(piece.partition("=")[0]) not in names)


def strip_body(content_type, body, names):
    """A form or JSON body without the fields called one of names; other bodies unchanged."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime in ("application/x-www-form-urlencoded", "") and b"=" in body and body.lstrip()[:1] != b"{":
        return strip_query(body.decode("latin-1"), names).encode("latin-1")
    if mime == "application/json" or (not mime and body.lstrip()[:1] == b"{"):
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return body
        if isinstance(data, dict) and names & set(data):
            return json.dumps({k: v for k, v in data.items() if k not in names},
                              ensure_ascii=False).encode("utf-8")
    return body


def port_free(port):
    """True when nothing listens on 127.0.0.1:port and it can be bound now."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    except OSError:
        pass
    finally:
        probe.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class CallerGone(Exception):
    """The caller of a proxied request hung up before the client answered."""


def backend_request(port, method, target, headers=(), body=None, timeout=5.0, alive=None):
    """One HTTP request to a client's API on 127.0.0.1:port: (status, [(name, value)], body).

    While the answer is awaited, alive() is asked twice a second; once it is false the request
    is dropped (CallerGone), so that a check_event long poll leaves its events to the next one.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "127.0.0.1:%d" % port)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        if alive is not None:
            deadline = time.monotonic() + timeout
            while not select.select([conn.sock], [], [], 0.5)[0]:
                if not alive():
                    raise CallerGone()
                if time.monotonic() > deadline:
                    raise socket.timeout("timed out")
        res = conn.getresponse()
        return res.status, res.getheaders(), res.read()
    finally:
        conn.close()


###############################################################################
# 2. Children
###############################################################################


class Child(object):
    """One client process: its registry record, the process, and what supervision knows of it."""

    def __init__(self, record):
        # record: client, account, params (as given), port, pid, token, config ({section: {key:
        # text}} without the listen address), config_path, state_path, qrcode_path, pid_path.
        self.record = record
        self.proc = None          # the Popen of a process this controller started; None when adopted
        self.ready = False        # its API answered as this very process
        self.started = time.monotonic()
        self.failures = 0         # crashes in a row, for the restart backoff
        self.failed_starts = 0    # exits in a row before the API ever answered: each moves to a new port
        self.restart_at = None    # when a crashed client is due for its restart
        self.kill_at = None       # when a stopping client is killed if it still runs

    @property
    def name(self):
        return self.record["client"]

    @property
    def port(self):
        return self.record["port"]

    @property
    def pid(self):
        return self.record["pid"]

    def public(self):
        """The record as the original answers it: the parameters, account, client, pid, port."""
        return dict(self.record["params"], client=self.name, account=self.record["account"],
                    pid=self.pid, port=self.port)

    def render_config(self):
        """The INI text the client process reads: [webqq], [showmsg], [openqq] on its port."""
        parser = configparser.ConfigParser(interpolation=None)
        for section, values in self.record["config"].items():
            parser[section] = values
        parser["openqq"]["listen"] = json.dumps([{"host": "127.0.0.1", "port": self.port}])
        text = io.StringIO()
        parser.write(text)
        return text.getvalue()

    def write_config(self):
        """Write the INI file; ValueError, saying what is wrong, when webqq would refuse it."""
        atomic_write(self.record["config_path"], self.render_config())
        read_config(self.record["config_path"])

    def spawn(self):
        """Start the client process (raises OSError, or ValueError for a config webqq refuses)."""
        self.write_config()
        # The WEBQQ_* variables of the controller's environment would override the INI file.
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
        if os.name == "nt":
            detach = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            detach = {"start_new_session": True}   # a Ctrl-C meant for the controller spares them
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(webqq.__file__), "-c", self.record["config_path"]],
            stdin=subprocess.DEVNULL, close_fds=True, env=env, **detach)
        self.record["pid"] = self.proc.pid
        self.started, self.ready, self.restart_at = time.monotonic(), False, None

    def alive(self):
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_alive(self.pid)

    def read_state(self):
        """The client's state file as a dict, or None."""
        try:
            with open(self.record["state_path"], encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def exited_on_purpose(self):
        """True when the process got going and then went through Client.stop() (stop_client, a
        fatal login failure...); not when it stopped right away (its API port taken)."""
        state = self.read_state() or {}
        return state.get("pid") == self.pid and state.get("state") == "stop" and \
            state.get("previous_state") not in (None, "init")

    def call(self, method, target, headers=(), body=None, timeout=3.0, alive=None):
        """A request to this client's API with its token: (status, headers, body)."""
        headers = [("Authorization", "Bearer " + self.record["token"])] + list(headers)
        return backend_request(self.port, method, target, headers, body, timeout, alive)

    def probe(self, attempts=1):
        """True when the API on our port answers as this process (tried attempts times)."""
        for attempt in range(attempts):
            if attempt:
                time.sleep(0.5)
            try:
                status, _, body = self.call("GET", "/openqq/get_client_info", timeout=2.0)
                if status == 200 and json.loads(body.decode("utf-8")).get("pid") == self.pid:
                    return True
            except (OSError, http.client.HTTPException, ValueError, AttributeError):
                pass
        return False

    def ask_to_stop(self, timeout):
        """Ask the client to stop through its API (works on every OS), else terminate it."""
        self.kill_at = time.monotonic() + timeout
        if not self.alive():
            return True
        try:
            status, _, _ = self.call("POST", "/openqq/stop_client")
            if status == 200:
                return True
        except (OSError, http.client.HTTPException):
            pass
        return self.terminate()

    def terminate(self, hard=False):
        """SIGTERM the process (the client stops cleanly), or kill it if hard; False on failure."""
        try:
            if self.proc is not None:
                (self.proc.kill if hard else self.proc.terminate)()
            else:
                os.kill(self.pid, getattr(signal, "SIGKILL", signal.SIGTERM) if hard else signal.SIGTERM)
            return True
        except OSError:
            return not self.alive()

    def kill(self):
        return self.terminate(hard=True)


###############################################################################
# 3. Routes
###############################################################################


def client_not_exists():
    """The original's answer when the named client is not there (HTTP 200, code 1)."""
    return ApiError(200, CLIENT_ERROR, "client not exists")


class Api(webqq.Api):
    """The controller's routes; every other /openqq/ path goes to the named client."""

    name = "controller"
    ROUTES = {"/openqq/start_client": "start_client", "/openqq/stop_client": "stop_client",
              "/openqq/check_client": "check_client", "/openqq/get_qrcode": "get_qrcode"}

    def __init__(self, controller):
        webqq.Api.__init__(self, controller.guard, controller.log)
        self.controller = controller

    def route(self, req):
        route = self.ROUTES.get(req.path) if req.method in ("GET", "HEAD") else None
        if route is not None:
            return getattr(self, route)
        if req.path.startswith("/openqq/"):
            return self.proxy
        raise ApiError(403, API_NOT_FOUND, "api not found")

    @staticmethod
    def client_name(req, required=True):
        """The client parameter (None when missing and not required); a name unfit for a file name is refused."""
        value = req.params.get("client")
        if isinstance(value, tuple):
            raise bad_request("parameter client given more than once")
        if value in (None, ""):
            if required:
                raise ApiError(200, CLIENT_ERROR, "client not found")
            return None
        if not NAME.match(value):
            raise bad_request("client must be 1 to 64 letters, digits or _ @ . - (not starting with .)")
        return value

    def child(self, req):
        """The client the request names; the original's code-1 answer when it names none or an unknown one."""
        child = self.controller.client(self.client_name(req))
        if child is None:
            raise client_not_exists()
        return child

    def start_client(self, req):
        name = self.client_name(req)
        params = {}
        for key, value in req.params.items():
            if isinstance(value, tuple):
                raise bad_request("parameter %s given more than once" % key)
            if key not in STEERING:
                params[key] = value
        return self.controller.start_client(name, params)

    def stop_client(self, req):
        return self.controller.stop_client(self.client_name(req))

    def check_client(self, req):
        children = [self.child(req)] if self.client_name(req, required=False) else self.controller.clients()
        return {"code": 0, "client": [self.controller.describe(child) for child in children]}

    def get_qrcode(self, req):
        child = self.child(req)
        try:
            with open(child.record["qrcode_path"], "rb") as f:
                png = f.read()
        except OSError:
            return Response(b"", 404, content_type="text/plain; charset=utf-8")
        return Response(png, 200, [("Cache-Control", "no-cache")], content_type="image/png")

    def proxy(self, req):
        """Pass the request on to the client's Openqq API and its answer back, as they are."""
        child = self.child(req)
        query = strip_query(req.query, STEERING)
        target = req.path + ("?" + query if query else "")
        body = strip_body(req.headers.get("content-type"), req.body, STEERING)
        headers = [(k, v) for k, v in req.headers.items() if k not in HOP_HEADERS]
        if body or req.method in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        try:
            status, res_headers, res_body = child.call(req.method, target, headers, body,
                                                       self.controller.opts["proxy_timeout"], req.alive)
        except CallerGone:
            return Response(b"", 499)     # nobody is there to read it
        except (OSError, http.client.HTTPException) as e:
            self.log.warning("client %s on port %d did not answer %s: %s", child.name, child.port, req.path, e)
            raise ApiError(502, NOT_REACHABLE, "client not reachable", [("Retry-After", "1")],
                           client=child.name, state=self.controller.state_of(child))
        content_type = "application/octet-stream"
        passed = []
        for key, value in res_headers:
            if key.lower() == "content-type":
                content_type = value
            elif key.lower() not in OWN_RESPONSE_HEADERS:
                passed.append((key, value))
        return Response(res_body, status, passed, content_type)


###############################################################################
# 4. Server
###############################################################################


class Server(ApiServer):
    """One listen address of the controller (threads controller-<port>, controller-conn-<port>)."""

    name = "controller"

###############################################################################
# 5. Controller
###############################################################################


class Controller(object):
    """Starts, watches, restarts and stops one client process per account; serves the Api."""

    OPTIONS = OPTIONS

    def __init__(self, **options):
        opts = read_options("controller", self.OPTIONS, {k: v for k, v in options.items() if v is not None})
        opts["backend_start_port"] = min(max(opts["backend_start_port"], 1), 49152)
        self.opts = opts
        self.log = logging.getLogger("webqq").getChild("controller")
        self.tmpdir = os.path.abspath(opts["tmpdir"] or tempfile.gettempdir())
        if not os.path.isdir(self.tmpdir):
            os.makedirs(self.tmpdir, 0o700)
        self.pid_path = opts["pid_path"] or os.path.join(self.tmpdir, "mojo_webqq_controller_process.pid")
        self.backend_path = opts["backend_path"] or os.path.join(self.tmpdir,
                                                                 "mojo_webqq_controller_backend.json")
        self.entries = listen_entries(opts["listen"], default_port=4000)
        check_protected(self.entries, opts["access_token"], opts["auth"], opts["allow_insecure"], "controller")
        self.guard = Guard(opts["access_token"], opts["auth"], to_list(opts["allow_origin"]), self.log)
        self.api = Api(self)
        self.lock = threading.RLock()    # guards children, stopping and the registry file
        self.children = collections.OrderedDict()
        self.stopping = []               # children asked to stop, watched until they are gone
        self.servers = []
        self.threads = []
        self.poller = Poller(self, self.opts["poll_api"], "controller-poll") if self.opts["poll_api"] else None
        self.stopped = threading.Event()
        self.own_pid_file = False

    # -- lifecycle ------------------------------------------------------------

    def start(self):
        """Claim the pid file, adopt the registry's live clients, serve; returns at once."""
        self.claim_pid_file()
        try:
            self.adopt()
            self.servers = serve(Server, self.entries, self.api, self.log)
        except Exception:
            self.release_pid_file()
            raise
        self.spawn_thread("controller-watch", self.watch)
        if self.poller is not None:
            self.poller.start()
        self.log.info("controller listening on %s (pid %d)", ", ".join(self.urls), os.getpid())
        return self

    @property
    def urls(self):
        return [server.url for server in self.servers]

    @property
    def url(self):
        return self.urls[0]

    def spawn_thread(self, name, target):
        thread = webqq.Thread(name, target, log=self.log)
        self.threads.append(thread)
        thread.start()

    def stop(self, stop_clients=False):
        """Stop serving; returns when every controller thread has ended.

        Clients keep running: a controller started again within client_grace seconds adopts
        them, else they stop by themselves. stop_clients=True stops (and waits for) them too.
        """
        if self.stopped.is_set():
            return
        self.stopped.set()
        for server in self.servers:
            server.close()
        if self.poller is not None:
            self.poller.stop()
        for thread in self.threads:
            thread.join()
        if stop_clients:
            for name in [child.name for child in self.clients()]:
                self.stop_client(name)
            deadline = time.monotonic() + self.opts["stop_timeout"] + 5
            while self.stopping and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.05)
        self.reap()
        with self.lock:
            self.save()
        self.release_pid_file()
        self.log.info("controller stopped")

    def claim_pid_file(self):
        other = read_pid(self.pid_path)
        if other and other != os.getpid() and pid_alive(other):
            raise RuntimeError("another controller (pid %d) uses %s" % (other, self.pid_path))
        atomic_write(self.pid_path, str(os.getpid()), 0o644)
        self.own_pid_file = True

    def release_pid_file(self):
        if self.own_pid_file:
            remove_file(self.pid_path)
            self.own_pid_file = False

    # -- registry -------------------------------------------------------------

    def save(self):
        """Write the registry file (call with the lock held)."""
        data = {"clients": [child.record for child in self.children.values()]}
        save_file(self.backend_path, json_dumps(data), self.log, ("控制器注册表", "registry"))

    def adopt(self):
        """Take over the registry's clients that still run and answer as themselves."""
        try:
            with open(self.backend_path, encoding="utf-8") as f:
                records = json.load(f)["clients"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log.error("registry %s unreadable, starting empty: %s", self.backend_path, e)
            return
        with self.lock:
            for record in records:
                child = Child(record)
                if child.alive() and child.probe(attempts=3):
                    child.ready = True
                    self.children[child.name] = child
                    self.log.info("client %s (pid %d, port %d) adopted", child.name, child.pid, child.port)
                else:
                    self.log.info("client %s (pid %d) no longer runs: dropped", child.name, child.pid)
                    remove_file(record["config_path"])
            self.save()

    # -- clients --------------------------------------------------------------

    def clients(self):
        with self.lock:
            return list(self.children.values())

    def client(self, name):
        with self.lock:
            return self.children.get(name)

    @staticmethod
    def state_of(child, state=None):
        """The state of the client process: "stop" while it is gone (awaiting a restart), "init"
        until it has written its state file."""
        if not child.alive():
            return "stop"
        state = child.read_state() if state is None else state
        return state.get("state", "init") if state and state.get("pid") == child.pid else "init"

    def describe(self, child):
        """check_client's entry: the state file's content, the client and its port; what the
        controller knows while the process has not written its file yet (the original answered
        "client state file read error" then)."""
        state = child.read_state()
        if state is None or state.get("pid") != child.pid:
            state = {"account": child.record["account"], "pid": child.pid}
        state["state"] = self.state_of(child, state)
        return dict(state, client=child.name, port=child.port)

    def client_config(self, name, params, token):
        """The child's record fields from the start_client parameters; ApiError for a bad value."""
        opts = self.opts
        for key, value in params.items():
            if re.search(r"[\x00-\x1f\x7f]", key + value):
                raise bad_request("parameter %s contains control characters" % key[:40])
        tmpdir = os.path.abspath(params.get("tmpdir") or self.tmpdir)
        paths = {kind + "_path": os.path.abspath(params.get(kind + "_path") or os.path.join(
            tmpdir, "mojo_webqq_%s_%s.%s" % (kind, name, ext)))
            for kind, ext in (("state", "json"), ("qrcode", "png"), ("pid", "pid"))}
        client = {"account": name, "tmpdir": tmpdir, "qrcode_display": "none", "log_level": opts["log_level"],
                  "controller_pid_path": self.pid_path, "controller_grace": str(opts["client_grace"])}
        if opts["log_path"]:
            client["log_path"] = os.path.abspath(opts["log_path"])
        server = {"access_token": token, "stop_delay": "1"}
        if opts["post_api"]:
            server["post_api"] = opts["post_api"]
        ignored = []
        for key, value in params.items():
            if key in Client.OPTIONS and key not in OWN_CLIENT_OPTIONS:
                client[key] = os.path.abspath(value) if key in ("log_path", "cookie_path") else value
            elif key in CLIENT_OPENQQ_OPTIONS:
                server[key] = value
            else:
                ignored.append(key)
        client.update(paths, tmpdir=tmpdir)        # absolute, as the registry has them
        if ignored:
            self.log.warning("client %s: parameter(s) %s ignored (not a client option)", name, ", ".join(ignored))
        for key in ("post_api", "poll_api"):
            if server.get(key):
                server[key] = with_client(server[key], name)
        return dict(paths, config={"webqq": client, "showmsg": {}, "openqq": server})

    def start_client(self, name, params):
        """start_client's answer: a new client process, or why not."""
        if not self.await_stopped(name):
            return {"code": CLIENT_ERROR, "status": "client still stopping", "client": name}
        with self.lock:
            child = self.children.get(name)
            if child is not None:
                return dict(child.public(), code=0, status="client already exists")
            if len(self.children) >= self.opts["max_clients"]:
                return {"code": MAX_CLIENTS, "status": "max clients exceed"}
            token = secrets.token_urlsafe(24)
            fields = self.client_config(name, params, token)
            port = self.free_port()
            if port is None:
                return {"code": NO_PORT, "status": "no available port", "client": name}
            record = dict(fields, client=name, account=name, params=params, port=port, pid=0, token=token,
                          config_path=os.path.join(self.tmpdir, "mojo_webqq_controller_client_%s.ini" % name))
            child = Child(record)
            try:
                child.spawn()
            except ValueError as e:     # a parameter webqq's config reader refuses, told as it tells it
                remove_file(record["config_path"])
                text, where = str(e), getattr(e, "where", None)
                if where and text.startswith(where + ": "):     # not the INI file's path and line
                    text = text[len(where) + 2:]
                raise bad_request("parameter " + text)
            except OSError as e:
                self.log.error("client %s could not be started: %s", name, e)
                return {"code": SPAWN_FAILED, "status": "failure"}
            self.children[name] = child
            self.save()
        self.log.info("client %s started (pid %d, port %d)", name, child.pid, port)
        return dict(child.public(), code=0, status="success")

    def stop_client(self, name):
        """stop_client's answer: the client is asked to stop and forgotten."""
        with self.lock:
            child = self.children.pop(name, None)
            if child is None:
                return client_not_exists().body
            self.stopping.append(child)
            self.save()
        if not child.ask_to_stop(self.opts["stop_timeout"]):
            return {"code": CLIENT_ERROR, "status": "failure"}
        self.log.info("client %s (pid %d) stopping", name, child.pid)
        return dict(child.public(), code=0, status="success")

    def await_stopped(self, name):
        """Wait until no process of client name that was asked to stop runs any more (reap() kills it
        after its stop_timeout): until then it holds the account's pid and INI files. False if one still runs."""
        with self.lock:
            old = [child for child in self.stopping if child.name == name]
        deadline = time.monotonic() + self.opts["stop_timeout"] + 5
        for child in old:
            while child.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if child.alive():
                return False
            self.forget(child)
        return True

    def forget(self, child):
        """Drop a stopped client that is gone, and its INI file (once, whoever sees it gone first)."""
        with self.lock:
            if child in self.stopping:
                self.stopping.remove(child)
                remove_file(child.record["config_path"])

    def free_port(self, preferred=None):
        """A port for a client's API: preferred (a restarting client's own) if it is free, else
        the first one from backend_start_port that no client of ours holds and that is free
        on 127.0.0.1. Call with the lock held: that is what keeps two clients off one port."""
        if preferred and port_free(preferred):
            return preferred
        taken = {c.port for c in self.children.values()} | {c.port for c in self.stopping}
        for port in range(self.opts["backend_start_port"], 65536):
            if port not in taken and port_free(port):
                return port
        return None

    # -- supervision ----------------------------------------------------------

    def watch(self):
        while not self.stopped.wait(self.opts["check_interval"]):
            try:
                self.check()
            except Exception:
                self.log.exception("controller check failed")

    def check(self):
        """One round: reap stopped clients, mark ready ones, restart crashed ones."""
        self.reap()
        now = time.monotonic()
        for child in self.clients():
            if child.alive():
                if not child.ready:
                    if child.probe():
                        child.ready, child.failed_starts = True, 0
                        self.log.debug("client %s answers on port %d", child.name, child.port)
                    elif now - child.started > self.opts["start_timeout"]:
                        self.log.error("client %s (pid %d) did not answer on port %d within %gs: killed",
                                       child.name, child.pid, child.port, self.opts["start_timeout"])
                        child.kill()
                elif child.failures and now - child.started > STABLE_AFTER:
                    child.failures = 0
            elif child.restart_at is None:
                self.exited(child, now)
            elif now >= child.restart_at:
                self.restart(child)

    def exited(self, child, now):
        """A client process is gone: forget it if it stopped on purpose, else plan its restart.

        One that never answered on its port (someone took the port between our check and its
        bind, or it could not start) is tried again on another port, FAILED_STARTS_MAX times.
        """
        with self.lock:
            if self.children.get(child.name) is not child:
                return
            on_purpose = child.exited_on_purpose()
            if not on_purpose and not child.ready:
                child.failed_starts += 1
            if on_purpose or child.failed_starts >= FAILED_STARTS_MAX:
                del self.children[child.name]
                self.save()
                remove_file(child.record["config_path"])
                if on_purpose:
                    self.log.info("client %s (pid %d) has stopped", child.name, child.pid)
                else:
                    self.log.error("client %s (pid %d) never answered on its port: given up, see its log",
                                   child.name, child.pid)
                return
            why = "died" if child.ready else "exited before it answered on port %d" % child.port
            delay = min(self.opts["restart_delay"] * 2 ** child.failures, RESTART_DELAY_MAX)
            child.failures += 1
            child.restart_at = now + delay
        self.log.warning("client %s (pid %d) %s; restart in %gs", child.name, child.pid, why, delay)

    def restart(self, child):
        with self.lock:
            if self.children.get(child.name) is not child:
                return
            port = self.free_port(preferred=None if child.failed_starts else child.port)
            if port is None:
                child.restart_at = time.monotonic() + RESTART_DELAY_MAX
                self.log.error("client %s: no free port to restart on", child.name)
                return
            child.record["port"] = port
            try:
                child.spawn()
            except (OSError, ValueError) as e:
                child.restart_at = time.monotonic() + RESTART_DELAY_MAX
                self.log.error("client %s could not be restarted: %s", child.name, e)
                return
            self.save()
        self.log.info("client %s restarted (pid %d, port %d)", child.name, child.pid, child.port)

    def reap(self):
        """Forget stopping clients that are gone; kill those past their stop_timeout."""
        with self.lock:
            stopping = list(self.stopping)
        for child in stopping:
            if not child.alive():
                self.forget(child)
            elif time.monotonic() > child.kill_at:
                self.log.warning("client %s (pid %d) did not stop in time: killed", child.name, child.pid)
                child.kill()
                child.kill_at = time.monotonic() + self.opts["stop_timeout"]

    # -- poll_api -------------------------------------------------------------

    def polling(self):
        """poll_api is polled all the time the controller runs."""
        return True

    def owns(self, url):
        """True when url points into this controller's /openqq/ API."""
        return points_into(url, self.servers)


###############################################################################
# 6. CLI
###############################################################################


def flag_type(check):
    """An option's check as an argparse type: what the check refuses is the flag's error."""
    def convert(text):
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
    return convert


def build_parser():
    parser = ArgumentParser(
        prog="webqq controller", description="The multi-account Controller API: one webqq process per account.")
    for name, entry in OPTIONS.items():
        (default, text), check = entry[:2], entry[2] if len(entry) > 2 else None
        flag = "--" + name.replace("_", "-")
        if text is None:
            continue
        if name == "listen":
            parser.add_argument(flag, action="append", type=flag_type(parse_listen), metavar="HOST:PORT",
                                help=text + " (default 127.0.0.1:4000; repeat for more)")
        elif name == "allow_origin":
            parser.add_argument(flag, action="append", metavar="ORIGIN", help=text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag, type=flag_type(check) if check else None,
                                help=text + (" (default %s)" % default if default is not None else ""))
    return parser


def main(argv=None):
    """`python webqq.py controller [flags]`: run the controller until interrupted; the exit status."""
    args = vars(build_parser().parse_args(argv))
    configure_logging(args["log_level"] or "info", args["log_path"])
    try:
        controller = Controller(**args).start()
    except (RuntimeError, ValueError, OSError) as e:
        logging.getLogger("webqq").error("controller not started: %s", e)
        return 2 if isinstance(e, webqq.BindError) else 1
    done = threading.Event()
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    controller.stop()
    return 0
