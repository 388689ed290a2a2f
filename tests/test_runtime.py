"""The client's threads as they run: a loop that meets an unexpected error carries on (and says so)."""
import logging

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
