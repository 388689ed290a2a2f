"""webqq started as people start it: `python webqq.py -c FILE` in a process of its own, against real
simulators on 127.0.0.1, talked to over HTTP; every log is checked for tracebacks."""
import requests

from conftest import free_port, wait_until
from onebot_sim import OneBotSimulator
from test_onebot import CAROL, ME, PERL, SECRET, TOKEN, WORLD


def write_config(tmp_path, text):
    path = tmp_path / "webqq.ini"
    path.write_text(text, encoding="utf-8")
    return path


def get(base, route, **params):
    return requests.get(base + route, params=params, timeout=15)


def test_one_webqq_module_under_python_webqq_py(tmp_path, launch):
    """Core and plugins share one module: onebot's send of a sess message passes Client's isinstance
    check (a second copy of webqq.py answered HTTP 500 here)."""
    sim = OneBotSimulator("napcat", WORLD, access_token=TOKEN, secret=SECRET).start()
    try:
        receiver, api = free_port(), free_port()
        sim.post_url = "http://127.0.0.1:%d/" % receiver
        config = write_config(tmp_path, "[webqq]\naccount = entry\nupstream = onebot\ntmpdir = %s\n\n"
                              "[onebot]\nurl = %s\naccess_token = %s\nsecret = %s\nlisten = 127.0.0.1:%d\n\n"
                              "[openqq]\nlisten = 127.0.0.1:%d\n" % (tmp_path, sim.url, TOKEN, SECRET, receiver, api))
        program = launch("-c", config)
        program.wait_log(r"\(running\)")
        base = "http://127.0.0.1:%d/openqq/" % api
        answer = get(base, "send_sess_message", group_id=PERL, id=CAROL, content="hi carol")
        assert answer.status_code == 200 and answer.json()["code"] == 0
        assert wait_until(lambda: sim.sent and sim.sent[-1]["user_id"] == CAROL)
        assert sim.sent[-1]["temp"] and sim.sent[-1]["group_id"] == PERL
        assert get(base, "get_user_info").json()["uid"] == ME
        assert program.stop() == 0
    finally:
        sim.stop()
