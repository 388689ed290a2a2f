"""Shared fixtures: a simulator on 127.0.0.1:0 and clients pointed at it."""
import os
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

import webqq  # noqa: E402
from smartqq_sim import Simulator  # noqa: E402

SMALL_WORLD = {"friends": 6, "groups": 2, "members": 6, "discusses": 1, "seed": 7}


@pytest.fixture
def sim():
    """A running simulator with a small generated world; polls are held 1 s."""
    s = Simulator(world=SMALL_WORLD, poll_hold=1.0)
    s.start()
    yield s
    s.stop()


class Recorder(object):
    """Every event a client emits, in order, with a condition to wait on."""

    def __init__(self, client):
        self.events = []
        self.cond = threading.Condition()
        client.on("all_event", self.record)

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


@pytest.fixture
def running(sim, make_client):
    """A client logged in to the simulator by a QR scan, in state running."""
    client = make_client()
    client.start()
    scan_and_confirm(sim)
    assert client.wait_for_state("running", timeout=10)
    return client
