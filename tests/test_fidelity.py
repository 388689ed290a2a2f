"""What scripts see, on both upstreams (issue 13): the exact JSON of reports and answers, key by key
with its JSON type, on the SmartQQ simulator and on every OneBot profile; the 1.x names old scripts
still send; and no silent gaps on OneBot (relogins, anonymous messages, groups the list leaves out).

Each upstream is one stack (simulator, client, Openqq plugin, post_api receiver) shared by the tests of
the module, whatever their order; the relogin tests, which change the world, have stacks of their own."""
import json

import pytest
import requests

import webqq
from conftest import Receiver, Recorder, free_port, scan_and_confirm, wait_until
from onebot_sim import OneBotSimulator
from smartqq_sim import Simulator

ANY_INT, ANY_STR = int, str      # in an expected JSON: any value of that type

# -- the SmartQQ world ------------------------------------------------------------------------------
ME = 10001                                       # the account: uin == qq on SmartQQ, the QQ number on OneBot
ALICE, ALICE_QQ = 2000001, 20001
BOB, BOB_QQ = 2000002, 20002
CAROL, CAROL_QQ = 4000001, 40001
DAVE, DAVE_QQ = 4000002, 40002
ERIN, ERIN_QQ = 4000003, 40003
FAMILY, FAMILY_CODE, FAMILY_QQ = 3000001, 3100001, 30001
WORK, WORK_CODE, WORK_QQ = 3000002, 3100002, 30002
DINNER = 5000001
SMARTQQ_WORLD = {
    "user": {"qq": ME, "nick": "小灰"},
    "friends": [{"uin": ALICE, "qq": ALICE_QQ, "nick": "alice"}, {"uin": BOB, "qq": BOB_QQ, "nick": "bob"}],
    "groups": [
        {"gid": FAMILY, "code": FAMILY_CODE, "qq": FAMILY_QQ, "name": "家庭群", "markname": "我的家人",
         "memo": "相亲相爱", "createtime": 1400000000, "level": 2,
         "members": [{"uin": ME, "qq": ME, "card": "群主大人", "role": "owner"}, {"uin": ALICE, "role": "admin"},
                     {"uin": CAROL, "qq": CAROL_QQ, "nick": "carol", "card": "小卡"},
                     {"uin": ERIN, "qq": ERIN_QQ, "nick": "erin"}]},
        {"gid": WORK, "code": WORK_CODE, "qq": WORK_QQ, "name": "工作群", "markname": "搬砖",
         "members": [{"uin": ALICE, "role": "owner"}, {"uin": ME, "qq": ME}, {"uin": DAVE, "qq": DAVE_QQ,
                                                                            "nick": "dave"}]}],
    "discusses": [{"did": DINNER, "name": "周末聚餐", "owner": ME,
                   "members": [{"uin": ME}, {"uin": ALICE}, {"uin": DAVE, "qq": DAVE_QQ, "nick": "dave"}]}]}

# -- the OneBot world ------------------------------------------------------------------------------
PROFILES = ("spec", "gocq", "napcat", "llonebot")
FRIEND, FRANK, GRACE = 20001, 20006, 20007
MEMBER, HIDDEN_MEMBER, IVY, GINA, HANK = 40001, 40002, 40007, 40005, 40006
PERL, HIDDEN, NEW, OLD = 30001, 30003, 30004, 30005
ANONYMOUS_QQ = 80000000                          # the user_id OneBot gives anonymous messages
ONEBOT_WORLD = {
    "self": {"user_id": ME, "nickname": "小灰"},
    "friends": [{"user_id": FRIEND, "nickname": "alice"}, {"user_id": FRANK, "nickname": "frank"}],
    "groups": [
        {"group_id": PERL, "group_name": "PERL学习交流", "max_member_count": 500,
         "members": [{"user_id": ME, "role": "admin", "card": "管理员小灰"}, {"user_id": FRIEND, "role": "owner"},
                     {"user_id": MEMBER, "nickname": "carol", "card": "carol_card"}]},
        {"group_id": HIDDEN, "group_name": "隐藏群",
         "members": [{"user_id": ME}, {"user_id": HIDDEN_MEMBER, "nickname": "dave", "card": "戴夫"}]},
        {"group_id": OLD, "group_name": "旧群", "members": [{"user_id": ME}, {"user_id": GINA, "nickname": "gina"}]}]}


# -- helpers --------------------------------------------------------------------------------------

def same_json(actual, expected, where="$"):
    """actual equals expected, key for key, with the same JSON types (1 is not 1.0, "1" or true);
    a type in expected (ANY_INT, ANY_STR) stands for any value of that type."""
    if isinstance(expected, type):
        assert type(actual) is expected, "%s: %r is not a %s" % (where, actual, expected.__name__)
        return
    assert type(actual) is type(expected), "%s: %r (%s), expected %r (%s)" % (
        where, actual, type(actual).__name__, expected, type(expected).__name__)
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), "%s: keys %s, expected %s" % (
            where, sorted(actual), sorted(expected))
        for key in expected:
            same_json(actual[key], expected[key], "%s.%s" % (where, key))
    elif isinstance(expected, list):
        assert len(actual) == len(expected), "%s: %d items, expected %d" % (where, len(actual), len(expected))
        for index, (a, e) in enumerate(zip(actual, expected)):
            same_json(a, e, "%s[%d]" % (where, index))
    else:
        assert actual == expected, "%s: %r, expected %r" % (where, actual, expected)


def without_members(group):
    return {k: v for k, v in group.items() if k != "member"}


def with_content(content, post_type=None):
    return lambda r: r.get("content") == content and (post_type is None or r.get("post_type") == post_type)


def event(name):
    return lambda r: r.get("post_type") == "event" and r.get("event") == name


class Stack(object):
    """A simulator, a logged-in client with the Openqq plugin, and the post_api receiving its reports."""

    def __init__(self, name, tmpdir):
        self.name = name
        self.answers = {}       # content -> the JSON post_api answers to that report
        self.post_api = Receiver(respond=lambda hit: self.answers.get((hit.report or {}).get("content")))
        options = dict(tmpdir=str(tmpdir), send_interval=0, qrcode_display="none", log_level="info",
                       update_interval=3600)
        if name == "smartqq":
            self.sim = Simulator(world=SMARTQQ_WORLD, poll_hold=0.5).start()
            self.client = webqq.Client(smartqq_base=self.sim.url, qr_check_interval=0.05, poll_timeout=10,
                                       http_timeout=5, **options)
        else:
            knobs = {"allow_temp_session": True} if name == "gocq" else {}
            self.sim = OneBotSimulator(name, ONEBOT_WORLD, unlisted_groups=(HIDDEN,), **knobs).start()
            self.client = webqq.Client(upstream="onebot", upstream_options=dict(
                url=self.sim.url, listen="127.0.0.1:0", send_rate=0, poll_hold=0.2), **options)
        self.recorder = Recorder(self.client)
        self.plugin = self.client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}], post_api=self.post_api.url,
                                       check_event_timeout=1, check_event_list_max_size=100, stop_delay=0.1,
                                       post_timeout=5)
        self.base = self.plugin.urls[0] + "/openqq/"

    def start(self):
        self.client.start()
        if not self.onebot:
            scan_and_confirm(self.sim)
        else:
            self.sim.post_url = self.client.upstream.receiver.url
        assert self.client.wait_for_state("running", timeout=15)
        assert wait_until(lambda: all(g.members_loaded for g in self.client.contacts.groups()), 15)
        return self

    @property
    def onebot(self):
        return self.name != "smartqq"

    def get(self, route, **params):
        return requests.get(self.base + route, params=params, timeout=20)

    def report(self, where):
        """The post_api report matching where, and the same item as check_event hands it out."""
        report = self.post_api.wait(where)
        queued = [item for item in self.get("check_event").json() if where(item)]
        assert queued == [report]
        return report

    def sent(self, answer):
        """What the upstream received for the send that answered answer."""
        if self.onebot:
            return [s for s in self.sim.sent if s["message_id"] == answer["id"]]
        return [s for s in self.sim.sent if s["r"].get("msg_id") == answer["id"]]

    def close(self):
        self.client.stop()
        self.sim.stop()
        self.post_api.close()


def started(name, tmpdir):
    made = Stack(name, tmpdir)
    try:
        yield made.start()
    finally:
        made.close()


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    """A stack shared by the module's tests of that upstream."""
    yield from started(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture
def fresh(request, tmp_path):
    """A stack of the test's own."""
    yield from started(request.param, tmp_path)


EVERY = pytest.mark.parametrize("stack", ("smartqq",) + PROFILES, indirect=True)
SMARTQQ = pytest.mark.parametrize("stack", ("smartqq",), indirect=True)
ONEBOT = pytest.mark.parametrize("stack", PROFILES, indirect=True)


def group_json(stack):
    """get_group_basic_info's object of the group the tests write in (家庭群 / PERL学习交流)."""
    if stack.onebot:
        return {"code": None, "createtime": None, "id": PERL, "level": None, "markname": None, "max_admin": None,
                "max_member": 500, "memo": None, "name": "PERL学习交流", "owner_id": FRIEND, "owner_uid": FRIEND,
                "remark": None, "role": "manage", "uid": PERL}
    return {"code": FAMILY_CODE, "createtime": 1400000000, "id": FAMILY, "level": 2, "markname": None,
            "max_admin": None, "max_member": None, "memo": "相亲相爱", "name": "家庭群", "owner_id": ME,
            "owner_uid": ME, "remark": "我的家人", "role": "create", "uid": FAMILY_QQ}


def where_we_write(stack):
    """(group id, a member's id, that member's displayname, our card there)."""
    if stack.onebot:
        return PERL, MEMBER, "carol_card", "管理员小灰"
    return FAMILY, CAROL, "小卡", "群主大人"


def member_uid(stack, member):
    return member if stack.onebot else {CAROL: CAROL_QQ, ALICE: ALICE_QQ, DAVE: DAVE_QQ}[member]


# -- 1. group remark --------------------------------------------------------------------------------

@EVERY
def test_reports_name_a_group_by_its_name(stack):
    group, member, member_name, our_card = where_we_write(stack)
    gid = group_json(stack)["uid"]
    content = "group report %s" % stack.name
    if stack.onebot:
        mid = stack.sim.post_group_message(PERL, MEMBER, content)["message_id"]
    else:
        mid = stack.sim.inject_group_message(FAMILY, CAROL, content)
    same_json(stack.report(with_content(content)), {
        "class": "recv", "content": content, "group": group_json(stack)["name"], "group_id": group,
        "group_uid": gid, "id": mid, "post_type": "receive_message", "receiver": our_card, "receiver_id": ME,
        "receiver_uid": ME, "sender": member_name, "sender_id": member, "sender_uid": member_uid(stack, member),
        "time": ANY_INT, "type": "group_message"})
    basic = [g for g in stack.get("get_group_basic_info").json() if g["id"] == group]
    same_json(basic, [group_json(stack)])
    full = [g for g in stack.get("get_group_info").json() if g["id"] == group][0]
    same_json(without_members(full), group_json(stack))


@SMARTQQ
def test_the_remark_is_no_markname_and_no_displayname(stack):
    family = group_json(stack)
    found = stack.get("search_group", name="家庭群").json()
    same_json([without_members(g) for g in found], [family])
    assert [m["id"] for m in found[0]["member"]][:3] == [ME, ALICE, CAROL]
    same_json([without_members(g) for g in stack.get("search_group", remark="我的家人").json()], [family])
    same_json(stack.get("search_group", markname="我的家人").json(), {"code": 100, "status": "object not found"})
    same_json(stack.get("send_group_message", displayname="我的家人", content="by remark").json(),
              {"code": 101, "id": None, "status": "group not found"})
    answer = stack.get("send_group_message", displayname="家庭群", content="by displayname").json()
    same_json(answer, {"code": 0, "id": ANY_INT, "info": "发送正常", "status": "发送成功"})
    assert [s["target"] for s in stack.sent(answer)] == [FAMILY]
    report = stack.report(with_content("by displayname"))
    assert (report["group"], report["sender"]) == ("家庭群", "群主大人")


# -- 2. our name in temporary sessions ----------------------------------------------------------------

@EVERY
def test_sess_messages_name_us_by_our_card(stack):
    group, member, member_name, our_card = where_we_write(stack)
    family = group_json(stack)
    content = "sess out %s" % stack.name
    answer = stack.get("send_sess_message", group_id=group, id=member, content=content).json()
    refused = stack.name == "spec"         # the spec profile has no temporary sessions
    same_json(answer, {"code": -5 if refused else 0, "id": ANY_INT, "info": ANY_STR,
                       "status": "发送失败" if refused else "发送成功"})
    same_json(stack.report(with_content(content)), {
        "class": "send", "code": answer["code"], "content": content, "from": "api", "group": family["name"],
        "group_id": group, "group_uid": family["uid"], "id": answer["id"], "info": answer["info"],
        "msg": answer["status"], "post_type": "send_message", "receiver": member_name, "receiver_id": member,
        "receiver_uid": member_uid(stack, member), "sender": our_card, "sender_id": ME, "sender_uid": ME,
        "source": "local", "time": ANY_INT, "ttl": 0 if refused else 2, "type": "sess_message", "via": "group"})

    content = "sess in %s" % stack.name
    if stack.onebot:
        mid = stack.sim.post_private_message(MEMBER, content, sub_type="group", group_id=PERL)["message_id"]
    else:
        mid = stack.sim.inject_sess_message("group", FAMILY, CAROL, content)
    same_json(stack.report(with_content(content)), {
        "class": "recv", "content": content, "group": family["name"], "group_id": group,
        "group_uid": family["uid"], "id": mid, "post_type": "receive_message", "receiver": our_card,
        "receiver_id": ME, "receiver_uid": ME, "sender": member_name, "sender_id": member,
        "sender_uid": member_uid(stack, member), "time": ANY_INT, "type": "sess_message", "via": "group"})


# -- 3. received discussion messages --------------------------------------------------------------------

@SMARTQQ
def test_received_discuss_messages_carry_numeric_ids(stack):
    mid = stack.sim.inject_discuss_message(DINNER, ALICE, "discuss in")
    same_json(stack.report(with_content("discuss in")), {
        "class": "recv", "content": "discuss in", "discuss": "周末聚餐", "discuss_id": DINNER, "id": mid,
        "post_type": "receive_message", "receiver": "小灰", "receiver_id": ME, "receiver_uid": ME,
        "sender": "alice", "sender_id": ALICE, "sender_uid": ALICE_QQ, "time": ANY_INT, "type": "discuss_message"})
    mid = stack.sim.inject_sess_message("discuss", DINNER, DAVE, "discuss sess in")
    report = stack.report(with_content("discuss sess in"))
    same_json({k: report[k] for k in ("id", "sender_id", "receiver_id", "via")},
              {"id": mid, "sender_id": DAVE, "receiver_id": ME, "via": "discuss"})
    # what stays a string: the sender_id of our own discussion message, and the members' ids
    answer = stack.get("send_discuss_message", id=DINNER, content="discuss out").json()
    report = stack.report(with_content("discuss out"))
    same_json({k: report[k] for k in ("id", "discuss_id", "sender", "sender_id", "sender_uid")},
              {"id": answer["id"], "discuss_id": DINNER, "sender": "小灰", "sender_id": str(ME), "sender_uid": ME})
    members = stack.get("get_discuss_info").json()[0]["member"]
    same_json([m["id"] for m in members], [str(ME), str(ALICE), str(DAVE)])


# -- 4. the 1.x names -------------------------------------------------------------------------------

# (route, parameters, what the upstream receives: a SmartQQ target id, or a OneBot (user_id, group_id))
SMARTQQ_ALIASES = [
    ("send_message", {"id": ALICE}, ALICE),
    ("send_message", {"qq": ALICE_QQ}, ALICE),
    ("send_friend_message", {"qq": BOB_QQ}, BOB),
    ("send_group_message", {"gid": WORK}, WORK),
    ("send_group_message", {"gnumber": WORK_QQ}, WORK),
    ("send_group_message", {"gname": "工作群"}, WORK),
    ("send_discuss_message", {"did": DINNER}, DINNER),
    ("send_sess_message", {"gid": FAMILY, "id": CAROL}, CAROL),
    ("send_sess_message", {"gnumber": FAMILY_QQ, "qq": CAROL_QQ}, CAROL),
    ("send_sess_message", {"did": DINNER, "qq": DAVE_QQ}, DAVE),
    # a 2.x parameter in the same request wins
    ("send_friend_message", {"uid": ALICE_QQ, "qq": BOB_QQ}, ALICE),
    ("send_message", {"uid": BOB_QQ, "qq": ALICE_QQ}, BOB),
    ("send_group_message", {"uid": FAMILY_QQ, "gnumber": WORK_QQ}, FAMILY),
    ("send_group_message", {"name": "家庭群", "gname": "工作群"}, FAMILY),
    ("send_group_message", {"id": 1, "gid": WORK}, None),
    ("send_discuss_message", {"id": 1, "did": DINNER}, None),
    ("send_sess_message", {"group_id": WORK, "gid": FAMILY, "id": DAVE}, DAVE),
    ("send_sess_message", {"group_uid": WORK_QQ, "gnumber": FAMILY_QQ, "uid": DAVE_QQ, "qq": CAROL_QQ}, DAVE),
]
ONEBOT_ALIASES = [
    ("send_message", {"qq": FRIEND}, (FRIEND, None)),
    ("send_friend_message", {"qq": FRIEND}, (FRIEND, None)),
    ("send_group_message", {"gid": PERL}, (None, PERL)),
    ("send_group_message", {"gnumber": PERL}, (None, PERL)),
    ("send_group_message", {"gname": "PERL学习交流"}, (None, PERL)),
    ("send_friend_message", {"uid": FRIEND, "qq": FRANK}, (FRIEND, None)),
    ("send_group_message", {"uid": PERL, "gnumber": OLD}, (None, PERL)),
    ("send_group_message", {"id": 1, "gid": PERL}, None),
    ("send_discuss_message", {"did": 1}, None),
]
NOT_FOUND = {"send_message": (100, "friend"), "send_friend_message": (100, "friend"),
             "send_group_message": (101, "group"), "send_discuss_message": (102, "discuss")}


@EVERY
def test_1x_names_send_where_they_meant(stack):
    for route, params, target in ONEBOT_ALIASES if stack.onebot else SMARTQQ_ALIASES:
        content = "alias %s %s" % (route, json.dumps(params, sort_keys=True))
        answer = stack.get(route, content=content, **params).json()
        if target is None:
            code, what = NOT_FOUND[route]
            same_json(answer, {"code": code, "id": None, "status": "%s not found" % what})
            continue
        same_json(answer, {"code": 0, "id": ANY_INT, "info": "发送正常", "status": "发送成功"})
        sent = stack.sent(answer)
        if stack.onebot:
            assert [(s["user_id"], s["group_id"]) for s in sent] == [target], (route, params)
        else:
            assert [s["target"] for s in sent] == [target], (route, params)


@EVERY
def test_1x_names_search_and_kick(stack):
    if stack.onebot:
        friend, group, number, name, role = FRIEND, PERL, PERL, "PERL学习交流", "manage"
    else:
        friend, group, number, name, role = ALICE_QQ, FAMILY, FAMILY_QQ, "家庭群", "create"
    assert [f["uid"] for f in stack.get("search_friend", qq=friend).json()] == [friend]
    assert [f["uid"] for f in stack.get("search_friend", uid=friend, qq=1).json()] == [friend]
    for params in ({"gid": group}, {"gnumber": number}, {"gname": name}, {"gtype": role}, {"gname": name, "id": group},
                   {"name": name, "gname": "nothing"}, {"uid": number, "gnumber": 1}):
        found = stack.get("search_group", **params).json()
        assert [g["id"] for g in found] == [group], params
    same_json(stack.get("search_group", id=1, gid=group).json(), {"code": 100, "status": "object not found"})
    if stack.onebot:
        return
    # kick: gid / gnumber and member_qq (1.x); shutup keeps only its 2.x names: 1.x's time was seconds
    same_json(stack.get("shutup_group_member", gnumber=FAMILY_QQ, member_qq=ERIN_QQ, time=60).json(),
              {"code": 100, "status": "object not found"})
    same_json(stack.get("kick_group_member", gid=FAMILY, member_qq=1).json(),
              {"code": 100, "status": "member 1 not found"})
    same_json(stack.get("kick_group_member", gnumber=FAMILY_QQ, member_qq=ERIN_QQ).json(),
              {"code": 0, "status": "success"})
    assert stack.sim.admin_actions[-1]["members"] == [ERIN_QQ]
    assert stack.post_api.wait(event("lose_group_member"))["params"][0]["id"] == ERIN


# -- 5. OneBot: anonymous messages, groups missing from the list --------------------------------------------

@ONEBOT
def test_anonymous_group_messages_are_reported(stack):
    stack.answers["anonymous hello"] = {"reply": "收到", "shutup": 1}
    posted = stack.sim.post_group_message(PERL, ANONYMOUS_QQ, "anonymous hello", sub_type="anonymous",
                                          anonymous={"id": 4321, "name": "大力鬼", "flag": "4321|大力鬼"})
    same_json(stack.report(with_content("anonymous hello")), {
        "class": "recv", "content": "anonymous hello", "group": "PERL学习交流", "group_id": PERL, "group_uid": PERL,
        "id": posted["message_id"], "post_type": "receive_message", "receiver": "管理员小灰", "receiver_id": ME,
        "receiver_uid": ME, "sender": "匿名(大力鬼)", "sender_id": -4321, "sender_uid": None, "time": ANY_INT,
        "type": "group_message"})
    reply = stack.post_api.wait(with_content("收到", "send_message"))
    assert (reply["group_id"], reply["code"]) == (PERL, 0)
    assert [c for c in stack.sim.calls if c["action"] == "set_group_ban"] == []
    assert ANONYMOUS_QQ not in [m.id for m in stack.client.contacts.group(PERL).members]


@ONEBOT
def test_a_group_missing_from_the_list_is_fetched_on_its_own(stack):
    assert stack.client.contacts.group(HIDDEN) is None
    posted = stack.sim.post_group_message(HIDDEN, HIDDEN_MEMBER, "from the hidden group")
    same_json(stack.report(with_content("from the hidden group")), {
        "class": "recv", "content": "from the hidden group", "group": "隐藏群", "group_id": HIDDEN,
        "group_uid": HIDDEN, "id": posted["message_id"], "post_type": "receive_message", "receiver": "小灰",
        "receiver_id": ME, "receiver_uid": ME, "sender": "戴夫", "sender_id": HIDDEN_MEMBER,
        "sender_uid": HIDDEN_MEMBER, "time": ANY_INT, "type": "group_message"})
    asked = [(c["action"], c["params"].get("group_id")) for c in stack.sim.calls]
    assert ("get_group_info", HIDDEN) in asked and ("get_group_member_list", HIDDEN) in asked
    new_group = stack.post_api.wait(event("new_group"))["params"][0]
    assert (new_group["id"], new_group["name"], [m["id"] for m in new_group["member"]]) == (
        HIDDEN, "隐藏群", [ME, HIDDEN_MEMBER])
    assert [g["name"] for g in stack.get("get_group_basic_info").json()] == ["PERL学习交流", "旧群", "隐藏群"]
    stack.client._refresh("group")          # the periodic refresh: the list still leaves it out
    assert stack.client.contacts.group(HIDDEN) is not None
    assert stack.post_api.reports(event("lose_group")) == []


# -- 5. relogins: compared on OneBot, forgotten on SmartQQ ---------------------------------------------------

def relogin(stack):
    count = len(stack.recorder.named("relogin"))
    assert stack.get("relogin").json()["code"] == 0
    if not stack.onebot and stack.sim.wait_qr("waiting", timeout=3):
        scan_and_confirm(stack.sim)
    stack.recorder.wait("relogin", count + 1, timeout=20)
    assert stack.client.wait_for_state("running", timeout=15)


def member_json(uid, name, card=None, role="member"):
    return {"card": card, "city": None, "client_type": "unknown", "country": None, "id": uid, "join_time": ANY_INT,
            "last_speak_time": ANY_INT, "name": name, "province": None, "role": role, "sex": "unknown",
            "state": "unknown", "uid": uid}


def friend_json(uid, name):
    return {"category": "", "client_type": "unknown", "face": 0, "flag": 0, "id": uid, "is_vip": 0, "markname": None,
            "name": name, "state": "unknown", "uid": uid, "vip_level": 0}


def plain_group_json(gid, name, members, max_member=200, role="attend"):
    return {"code": None, "createtime": None, "id": gid, "level": None, "markname": None, "max_admin": None,
            "max_member": max_member, "member": members, "memo": None, "name": name, "owner_id": None,
            "owner_uid": None, "remark": None, "role": role, "uid": gid}


@pytest.mark.parametrize("fresh", PROFILES, indirect=True)
def test_a_relogin_reports_what_changed_meanwhile(fresh):
    stack, sim = fresh, fresh.sim
    sim.add_friend(GRACE, "grace")
    sim.remove_friend(FRANK)
    sim.add_group(NEW, "新群", [{"user_id": HANK, "nickname": "hank"}])
    sim.remove_group(OLD)
    sim.remove_member(PERL, MEMBER)
    sim.world.add_member(PERL, user_id=IVY, nickname="ivy")
    relogin(stack)
    perl = dict(group_json(stack), member=[member_json(ME, "小灰", "管理员小灰", "admin"),
                                           member_json(FRIEND, "alice", role="owner"), member_json(IVY, "ivy")])
    expected = {
        "new_friend": [friend_json(GRACE, "grace")],
        "lose_friend": [friend_json(FRANK, "frank")],
        "new_group": [plain_group_json(NEW, "新群", [member_json(HANK, "hank"), member_json(ME, "小灰")])],
        "lose_group": [plain_group_json(OLD, "旧群", [member_json(ME, "小灰"), member_json(GINA, "gina")])],
        "new_group_member": [member_json(IVY, "ivy"), perl],
        "lose_group_member": [member_json(MEMBER, "carol", "carol_card"), perl]}
    for name, params in expected.items():
        same_json(stack.post_api.wait(event(name)), {"event": name, "params": params, "post_type": "event"})
    changes = stack.post_api.reports(lambda r: r.get("event", "").startswith(("new_", "lose_")))
    assert sorted(r["event"] for r in changes) == sorted(expected)        # each once, nothing else
    assert [f["id"] for f in stack.get("get_friend_info").json()] == [FRIEND, GRACE]


@pytest.mark.slow
@pytest.mark.parametrize("fresh", ("smartqq",), indirect=True)
def test_a_smartqq_relogin_reloads_without_comparing(fresh):
    """SmartQQ's ids live as long as a login: a friend who comes back with another id is no news."""
    stack = fresh
    stack.sim.remove_friend(BOB)
    stack.sim.add_friend(uin=2000009, qq=BOB_QQ, nick="bob")
    stack.sim.add_friend(uin=2000007, qq=20007, nick="grace")
    before = len(stack.post_api.reports())
    relogin(stack)
    friends = stack.get("get_friend_info").json()
    assert [(f["id"], f["name"]) for f in friends] == [(ALICE, "alice"), (2000009, "bob"), (2000007, "grace")]
    changes = [r["event"] for r in stack.post_api.reports()[before:] if r.get("post_type") == "event"]
    assert not [name for name in changes if name.startswith(("new_", "lose_"))]
    family = [g for g in stack.get("get_group_basic_info").json() if g["id"] == FAMILY]
    same_json(family, [group_json(stack)])


# -- the program as people start it ---------------------------------------------------------------------

def test_python_webqq_py_reports_and_answers_like_the_original(tmp_path, launch):
    """`python webqq.py -c FILE` on the SmartQQ simulator: the group is named by its name, our sess message
    by our card, a discussion message carries numeric ids, and a 1.x script's send goes out."""
    sim = Simulator(world=SMARTQQ_WORLD, poll_hold=0.5, auto_scan=0.2).start()
    post_api = Receiver()
    try:
        api = free_port()
        config = tmp_path / "webqq.ini"
        config.write_text("[webqq]\naccount = fidelity\ntmpdir = %s\nsmartqq_base = %s\nqrcode_display = none\n"
                          "qr_check_interval = 0.1\nsend_interval = 0\n\n[openqq]\nlisten = 127.0.0.1:%d\n"
                          "post_api = %s\n" % (tmp_path, sim.url, api, post_api.url), encoding="utf-8")
        program = launch("-c", config)
        program.wait_log(r"\(running\)")
        base = "http://127.0.0.1:%d/openqq/" % api
        assert wait_until(lambda: requests.get(base + "get_group_info", timeout=10).json()[0]["member"], 15)

        mid = sim.inject_group_message(FAMILY, CAROL, "program group")
        same_json(post_api.wait(with_content("program group")), {
            "class": "recv", "content": "program group", "group": "家庭群", "group_id": FAMILY,
            "group_uid": FAMILY_QQ, "id": mid, "post_type": "receive_message", "receiver": "群主大人",
            "receiver_id": ME, "receiver_uid": ME, "sender": "小卡", "sender_id": CAROL, "sender_uid": CAROL_QQ,
            "time": ANY_INT, "type": "group_message"})
        answer = requests.post(base + "send_sess_message", data={"gnumber": FAMILY_QQ, "qq": CAROL_QQ,
                                                                  "content": "program sess"}, timeout=20).json()
        same_json(answer, {"code": 0, "id": ANY_INT, "info": "发送正常", "status": "发送成功"})
        report = post_api.wait(with_content("program sess"))
        same_json({k: report[k] for k in ("sender", "sender_id", "receiver", "receiver_id", "group", "via")},
                  {"sender": "群主大人", "sender_id": ME, "receiver": "小卡", "receiver_id": CAROL,
                   "group": "家庭群", "via": "group"})
        mid = sim.inject_discuss_message(DINNER, ALICE, "program discuss")
        report = post_api.wait(with_content("program discuss"))
        same_json({k: report[k] for k in ("id", "sender_id", "receiver_id")},
                  {"id": mid, "sender_id": ALICE, "receiver_id": ME})
        answer = requests.get(base + "send_message", params={"qq": ALICE_QQ, "content": "program 1.x"},
                              timeout=20).json()
        same_json(answer, {"code": 0, "id": ANY_INT, "info": "发送正常", "status": "发送成功"})
        assert [s["target"] for s in sim.sent if s["r"].get("msg_id") == answer["id"]] == [ALICE]
        assert program.stop() == 0
    finally:
        post_api.close()
        sim.stop()
