#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""soak: webqq under sustained load for a while, with figures (not run in CI).

    python scripts/soak.py --minutes 10 [--api-clients 50] [--pollers 200] [--rate 50]

Three processes: the simulator (scripts/smartqq_sim.py), webqq (a user script: Client plus the
Openqq plugin, logged in by the simulator's automatic scan), and this one, which runs at once
against webqq's Openqq API on loopback:

  * --api-clients connections calling the info, search and send routes in a loop,
  * --pollers connections long-polling check_event (--cursor-pollers of them read by cursor,
    each seeing every event; the others take events, each event going to one of them),
  * messages injected at the simulator at --rate per second (friends, groups and discusses).

Every --report seconds, and at the end, it prints the requests served, the errors, the p50/p99
latency of the API calls (long polls apart), and webqq's RSS and thread count; the summary
compares them with the start and accounts for every message injected and every send accepted.
"""

import argparse
import collections
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlencode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench import percentile, proc_status  # noqa: E402

# The webqq side: a user script, as the README has it.
CHILD = """
import json, sys
sys.path.insert(0, %r)
import webqq
options = json.loads(sys.argv[1])
client = webqq.Client(**options["client"])
client.load("openqq", **options["openqq"])
sys.exit(client.run())
""" % ROOT

WORLD = ["--friends", "60", "--groups", "12", "--members", "40", "--discusses", "4", "--seed", "1"]

###############################################################################
# Plumbing
###############################################################################


class Conn(object):
    """One keep-alive connection to a loopback HTTP server, reopened when the server closed it."""

    def __init__(self, port, timeout):
        self.port, self.timeout = port, timeout
        self.http = None

    def request(self, method, path, body=None):
        """(status, body bytes); OSError or HTTPException when there is no answer."""
        for attempt in (1, 2):
            if self.http is None:
                self.http = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.http.request(method, path, body, {"Content-Type": "application/json"} if body else {})
                r = self.http.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise

    def json(self, method, path, data=None):
        status, body = self.request(method, path, json.dumps(data).encode() if data is not None else None)
        return status, json.loads(body.decode("utf-8"))

    def close(self):
        if self.http is not None:
            self.http.close()
            self.http = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_threads(pid):
    """(RSS in kB, threads) of a process, from /proc."""
    status = proc_status(pid)
    return status["rss"], status["threads"]


def ms(values, p):
    """The p-th quantile (0..1) of values in seconds, in milliseconds; 0 for no values."""
    return (percentile(values, p) or 0.0) * 1000


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit("soak: %s did not happen within %d s" % (what, timeout))

###############################################################################
# The load
###############################################################################


class Load(object):
    """The API clients, the check_event pollers and the injector, until finish()."""

    def __init__(self, api_port, sim_port, world, args):
        self.api_port, self.sim_port, self.args = api_port, sim_port, args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.count = collections.Counter()
        self.errors = collections.Counter()
        self.latencies = collections.defaultdict(list)      # kind of call -> seconds, since window()
        self.all_latencies = collections.defaultdict(list)
        me = world["user"]["qq"]
        self.friends = [f["uin"] for f in world["friends"]]
        self.groups = [(g["gid"], g["qq"], [m["uin"] for m in g["members"] if m["uin"] != me]) for g in world["groups"]]
        names = collections.Counter(g["name"] for g in world["groups"])
        self.numbered = [g["qq"] for g in world["groups"] if names[g["name"]] == 1]   # others get no number
        self.discusses = [(d["did"], [m["uin"] for m in d["members"] if m["uin"] != me]) for d in world["discusses"]]
        self.injected = 0
        self.taken = collections.Counter()      # message ids check_event handed out in take mode
        self.accepted = collections.Counter()   # contents of the sends the API accepted
        self.threads = [threading.Thread(target=self.api_client, args=(n,), name="soak-api-%d" % n)
                        for n in range(args.api_clients)]
        self.threads += [threading.Thread(target=self.poller, args=(n, n < args.cursor_pollers),
                                          name="soak-poll-%d" % n) for n in range(args.pollers)]
        self.threads.append(threading.Thread(target=self.injector, name="soak-inject"))

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()

    def window(self):
        """{kind: API latencies} since the last call (kept for the summary too)."""
        with self.lock:
            taken, self.latencies = self.latencies, collections.defaultdict(list)
        for kind, values in taken.items():
            self.all_latencies[kind].extend(values)
        return taken

    def call(self, conn, route, params, kind="reads"):
        """One API call: its JSON, or None after counting the error."""
        started = time.monotonic()
        try:
            status, body = conn.json("GET", "/openqq/%s?%s" % (route, urlencode(params)))
        except (OSError, http.client.HTTPException, ValueError) as e:
            with self.lock:
                self.errors["%s: %s" % (route, e.__class__.__name__)] += 1
            return None
        took = time.monotonic() - started
        code = body.get("code", 0) if isinstance(body, dict) else 0
        with self.lock:
            if status != 200 or code != 0:
                self.errors["%s: HTTP %d code %s" % (route, status, code)] += 1
                return None
            self.count["long polls" if kind == "long polls" else "calls"] += 1
            self.latencies[kind].append(took)
        return body

    def api_client(self, n):
        rng, conn, sent = random.Random(n), Conn(self.api_port, 60), 0
        while not self.stop.is_set():
            roll = rng.random()
            if roll < 0.55:
                self.call(conn, rng.choice(["get_user_info", "get_friend_info", "get_group_basic_info",
                                            "get_discuss_info", "get_client_info"]), {})
            elif roll < 0.60:
                self.call(conn, "get_group_info", {})
            elif roll < 0.75:
                if rng.random() < 0.5:
                    self.call(conn, "search_friend", {"id": rng.choice(self.friends)})
                else:
                    self.call(conn, "search_group", {"uid": rng.choice(self.numbered)})
            else:
                sent += 1
                content = "soak out %d-%d" % (n, sent)
                to_friend = rng.random() < 0.5
                params = {"id": rng.choice(self.friends) if to_friend else rng.choice(self.groups)[0],
                          "content": content}
                if roll < 0.95:
                    params["async"] = 1
                if self.call(conn, "send_friend_message" if to_friend else "send_group_message", params,
                             "sends" if roll < 0.95 else "sync sends") is not None:
                    with self.lock:
                        self.accepted[content] += 1
        conn.close()

    def poller(self, n, by_cursor):
        conn, cursor = Conn(self.api_port, self.args.hold + 30), 0
        while not self.stop.is_set():
            events = self.call(conn, "check_event", {"cursor": cursor} if by_cursor else {}, "long polls")
            if not isinstance(events, list):
                self.stop.wait(1)
                continue
            for event in events:
                if by_cursor:
                    cursor = max(cursor, event.get("cursor", cursor))
                elif event.get("post_type") == "receive_message":
                    with self.lock:
                        self.taken[event["id"]] += 1
        conn.close()

    def injector(self):
        """Messages at the simulator, args.rate a second, round robin over the conversations."""
        conn, started, n = Conn(self.sim_port, 10), time.monotonic(), 0
        while not self.stop.wait(max(0.0, started + n / self.args.rate - time.monotonic())):
            text, kind = "soak in %d" % n, n % 10
            if kind < 5:
                call = ("inject_friend_message", {"sender": self.friends[n % len(self.friends)], "content": text})
            elif kind < 9:
                gid, _, members = self.groups[n % len(self.groups)]
                call = ("inject_group_message", {"group": gid, "sender": members[n % len(members)], "content": text})
            else:
                did, members = self.discusses[n % len(self.discusses)]
                call = ("inject_discuss_message", {"discuss": did, "sender": members[n % len(members)],
                                                   "content": text})
            try:
                conn.json("POST", "/sim/" + call[0], call[1])
                self.injected += 1
            except (OSError, http.client.HTTPException, ValueError):
                with self.lock:
                    self.errors["injection failed"] += 1
            n += 1
        conn.close()

###############################################################################
# The run
###############################################################################


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument("--api-clients", type=int, default=50)
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--cursor-pollers", type=int, default=20, help="pollers reading by cursor (default 20)")
    parser.add_argument("--rate", type=float, default=50.0, help="messages injected per second (default 50)")
    parser.add_argument("--hold", type=float, default=30.0, help="webqq's check_event_timeout, seconds (default 30)")
    parser.add_argument("--report", type=float, default=60.0, help="seconds between two progress lines")
    args = parser.parse_args(argv)

    tmpdir = tempfile.mkdtemp(prefix="webqq-soak-")
    sim_port, api_port = free_port(), free_port()
    children, done = [], False
    log = open(os.path.join(tmpdir, "soak.log"), "wb")
    try:
        children.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "scripts", "smartqq_sim.py"), "--port", str(sim_port),
             "--poll-hold", "20", "--auto-scan", "1"] + WORLD, stdout=log, stderr=subprocess.STDOUT))
        sim = Conn(sim_port, 10)
        wait_for(lambda: sim.json("GET", "/sim/state")[0] == 200, 30, "the simulator starting")
        world = sim.json("GET", "/sim/world")[1]
        options = {
            "client": {"account": "soak", "tmpdir": tmpdir, "smartqq_base": "http://127.0.0.1:%d" % sim_port,
                       "send_interval": 0, "qrcode_display": "none", "log_level": "warn", "qr_check_interval": 0.5},
            "openqq": {"listen": [{"host": "127.0.0.1", "port": api_port}], "check_event_timeout": args.hold,
                       "check_event_list_max_size": 1000},
        }
        webqq = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(options)], stdout=log,
                                 stderr=subprocess.STDOUT)
        children.append(webqq)
        api = Conn(api_port, 10)
        wait_for(lambda: api.json("GET", "/openqq/get_client_info")[1].get("state") == "running", 60, "the login")
        time.sleep(5)                                   # the background loading of members settles
        rss0, threads0 = rss_threads(webqq.pid)
        load = Load(api_port, sim_port, world, args)
        print("soak: %d API clients, %d check_event pollers (%d by cursor), %g messages/s for %g min; "
              "webqq pid %d: RSS %d kB, %d threads" % (args.api_clients, args.pollers, args.cursor_pollers,
                                                       args.rate, args.minutes, webqq.pid, rss0, threads0), flush=True)
        started = time.time()
        load.start()
        end, last = started + args.minutes * 60, (started, 0)
        while time.time() < end:
            time.sleep(min(args.report, max(0.0, end - time.time())))
            now, window = time.time(), load.window()
            rss, threads = rss_threads(webqq.pid)
            calls = load.count["calls"] + load.count["long polls"]
            calls_now = window["reads"] + window["sends"]
            print("%5.0f s  served %8d (%4.0f/s)  errors %4d  p50 %6.1f ms  p99 %7.1f ms  sync send p99 %7.1f ms  "
                  "injected %6d  RSS %6d kB  threads %4d" % (
                      now - started, calls, (calls - last[1]) / (now - last[0]), sum(load.errors.values()),
                      ms(calls_now, 0.5), ms(calls_now, 0.99),
                      ms(window["sync sends"], 0.99), load.injected, rss, threads), flush=True)
            last = (now, calls)
        rss1, threads1 = rss_threads(webqq.pid)
        load.finish()
        elapsed = time.time() - started
        time.sleep(5)
        rss2, threads2 = rss_threads(webqq.pid)
        info = api.json("GET", "/openqq/get_client_info")[1]
        sent = sim.json("GET", "/sim/sent")[1]
        delivered = collections.Counter(s["text"] for s in sent if s["delivered"])
        load.window()
        latencies, accepted = load.all_latencies, load.accepted
        calls = latencies["reads"] + latencies["sends"]
        print("\nsoak summary after %.0f s" % elapsed)
        print("  requests served   %d: %d API calls (%.0f/s), %d check_event answers" % (
            load.count["calls"] + load.count["long polls"], load.count["calls"], load.count["calls"] / elapsed,
            load.count["long polls"]))
        print("  errors            %d %s" % (sum(load.errors.values()), dict(load.errors.most_common(5))))
        print("  latency           p50 %.1f ms, p99 %.1f ms, max %.1f ms (reads and async sends); "
              "sync sends p50 %.1f ms, p99 %.1f ms (they wait for their turn in the send queue)" % (
                  ms(calls, 0.5), ms(calls, 0.99), max(calls or [0]) * 1000,
                  ms(latencies["sync sends"], 0.5), ms(latencies["sync sends"], 0.99)))
        print("  messages          %d injected, %d taken through check_event (%d of them twice), "
              "%d pushed out of its queue unread" % (load.injected, len(load.taken),
                                                     sum(1 for c in load.taken.values() if c > 1),
                                                     info.get("check_event_dropped", 0)))
        print("  sends             %d accepted by the API, %d delivered, %d not delivered" % (
            sum(accepted.values()), sum(min(n, delivered[t]) for t, n in accepted.items()),
            sum(max(0, n - delivered[t]) for t, n in accepted.items())))
        print("  webqq RSS         %d kB at the start, %d kB at the end of the load, %d kB 5 s later" % (
            rss0, rss1, rss2))
        print("  webqq threads     %d at the start, %d at the end of the load, %d 5 s later" % (
            threads0, threads1, threads2))
        done = True
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGINT)        # both stop cleanly on KeyboardInterrupt
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
        log.close()
        if done:
            shutil.rmtree(tmpdir, ignore_errors=True)
        else:
            print("soak: the simulator's and webqq's output is in %s" % log.name, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
