#!/usr/bin/env python3
"""bench: figures for the Openqq API against the simulator, all on loopback (a first version).

    python scripts/bench.py [--friends 2000] [--clients 32] [--seconds 5] [--runs 3]

Starts the simulator with a generated world, a client logged in to it with the openqq plugin,
and drives HTTP/1.1 keep-alive clients from a separate process (so the load does not share
the server's interpreter lock). Prints requests per second and p50/p99 latency, median of the
runs, for:

  get_friend_info               the whole friend list, served from the serialised cache
  send_friend_message (sync)    send_interval 0: the answer waits for the simulator's reply
  send_friend_message (async)   answered at once; the send queue drains behind it

Figures, not pass/fail.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(url, path, clients, seconds):
    """Run clients keep-alive connections against url+path for seconds: (count, latencies, errors)."""
    host, port = url.split("//")[1].split(":")
    latencies, errors, lock = [], [0], threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker():
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        mine, failed = [], 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                conn.request("GET", path)
                res = conn.getresponse()
                res.read()
                if res.status != 200:
                    failed += 1
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                continue
            mine.append(time.perf_counter() - started)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0]


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def measure(url, path, clients, seconds):
    """One run in a child process: {"rps", "p50", "p99", "errors"}."""
    out = subprocess.check_output([sys.executable, __file__, "--load", url, path, str(clients), str(seconds)])
    return json.loads(out.decode())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--friends", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--load", nargs=4, metavar=("URL", "PATH", "CLIENTS", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        url, path, clients, seconds = args.load
        latencies, errors = load(url, path, int(clients), float(seconds))
        print(json.dumps({"rps": len(latencies) / float(seconds), "p50": percentile(latencies, 0.5) * 1000,
                          "p99": percentile(latencies, 0.99) * 1000, "errors": errors}))
        return 0

    sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]
    import webqq
    from smartqq_sim import Simulator

    sim = Simulator(world={"friends": args.friends, "groups": 2, "members": 10, "discusses": 1, "seed": 1},
                    poll_hold=1.0)
    sim.start()
    client = webqq.Client(smartqq_base=sim.url, tmpdir=tempfile.mkdtemp(prefix="webqq-bench-"),
                          send_interval=0, qrcode_display="none", qr_check_interval=0.05, log_level="warn")
    plugin = client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}])
    client.start()
    sim.wait_qr("waiting", timeout=30)
    sim.scan()
    sim.confirm()
    client.wait_for_state("running", timeout=60)
    url = plugin.urls[0]
    friend = client.contacts.friends()[0]
    cases = [("get_friend_info (%d friends)" % len(client.contacts.friends()), "/openqq/get_friend_info"),
             ("send_friend_message sync", "/openqq/send_friend_message?id=%s&content=bench" % friend.id),
             ("send_friend_message async", "/openqq/send_friend_message?id=%s&content=bench&async=1" % friend.id)]
    print("%d keep-alive clients, %g s per run, median of %d runs" % (args.clients, args.seconds, args.runs))
    print("%-34s %10s %9s %9s %7s" % ("route", "req/s", "p50 ms", "p99 ms", "errors"))
    try:
        for name, path in cases:
            runs = [measure(url, path, args.clients, args.seconds) for _ in range(args.runs)]
            print("%-34s %10.0f %9.2f %9.2f %7d" % (
                name, statistics.median(r["rps"] for r in runs), statistics.median(r["p50"] for r in runs),
                statistics.median(r["p99"] for r in runs), sum(r["errors"] for r in runs)))
            client.wait_for_state("running", timeout=60)
    finally:
        client.stop()
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
