"""The client's threads as they run: a loop that meets an unexpected error carries on (and says so),
and a closed transport ends what would hold stop() up."""
import logging
import socket
import time

import pytest

import webqq
from conftest import LogLines, log_in, wait_until


def test_a_contact_update_that_fails_unexpectedly_is_logged_and_the_next_one_comes(sim, make_client):
    client = make_client(update_interval=0.2)
    log_in(sim, client)
    errors = LogLines(logging.ERROR)
    fetch_friends, failures = client.upstream.fetch_friends, []

    def malformed():        # an answer the parser never expected: not an UpstreamError
        if not failures:
            failures.append(1)
            raise KeyError("uin")
        return fetch_friends()
    client.upstream.fetch_friends = malformed
    try:
        assert wait_until(lambda: failures, 5)
        zed = sim.add_friend(nick="zed")
        client.recorder.wait("new_friend", where=lambda friend: friend.id == zed.uin, timeout=10)
    finally:
        errors.close()
    assert any(line.startswith("联系人更新出错 (contact update failed)") and "KeyError: 'uin'" in line
               for line in errors.lines), errors.lines
    assert client.state == "running"


def test_a_closed_http_refuses_new_requests_and_cuts_a_socket_opened_late(make_receiver):
    receiver = make_receiver()
    http = webqq.Http(timeout=5)
    assert http.get(receiver.url).status == 200
    http.close()
    with pytest.raises(webqq.TransportError, match="closed"):
        http.get(receiver.url)
    assert len(receiver.hits) == 1
    # a request that got past that check as close() ran: the socket it opens is shut at once
    late = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
    try:
        http._tracker.add(late)
        with pytest.raises(OSError):
            late.sendall(b"GET / HTTP/1.1\r\n\r\n")
    finally:
        late.close()


def test_a_stop_during_a_relogin_ends_every_thread_at_once(sim, make_client):
    """webqq-poll and webqq-update wait for the state running; a stop while a relogin holds the state
    elsewhere must end them too (they waited 15 s each: "thread webqq-poll did not stop")."""
    client = log_in(sim, make_client())
    sim.fault("/", delay=5)            # the relogin's first request hangs
    client.relogin()
    assert wait_until(lambda: any(r["path"] == "/" for r in list(sim.requests)[-20:]), 5)
    errors = LogLines(logging.ERROR)
    try:
        started = time.monotonic()
        client.stop()
        stopped_in = time.monotonic() - started
    finally:
        errors.close()
    assert not [line for line in errors.lines if "did not stop" in line]
    assert stopped_in < 5, stopped_in
