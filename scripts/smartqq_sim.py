#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""smartqq_sim: a protocol-faithful SmartQQ (w.qq.com) server on one loopback port.

Tencent shut SmartQQ down in 2019; this simulator serves the same paths, cookies, tokens,
hashes and answers as the real service (docs/simulator.md sums the protocol up), so a
client that rewrites every ``*.qq.com`` URL to the simulator's base URL (keeping path and
query) logs in by QR code, loads its contacts, long-polls, sends and administers groups
exactly as it did against Tencent. Cookies are host-only (``Path=/``, no Domain), so a
standard cookie jar on 127.0.0.1 sends every cookie to every path.

Command line
------------
    python scripts/smartqq_sim.py [--host 127.0.0.1] [--port 8090]
        [--world FILE | --friends N --groups M --members K --discusses D --seed S]
        [--poll-hold S] [--qr-ttl S] [--auto-scan SECONDS] [--idle json|error|504|502|100012]
        [--echo-group] [--set KNOB=VALUE ...] [--verbose]

Without world options it serves the demo world (DEMO_WORLD, listed in docs/simulator.md).
``--auto-scan SECONDS`` scans each QR half that time after it was fetched and confirms it after
the full time. ``--set`` sets any knob below (VALUE is read as JSON when it parses, else as a
string).

Python API (names are a contract; tests of the client use them)
---------------------------------------------------------------
    sim = Simulator(world=None, host="127.0.0.1", port=0, poll_hold=55.0, qr_ttl=120.0,
                    auto_scan=None, **knobs)
    sim.start(); sim.url; sim.stop()        # also a context manager
    sim.world                               # the World (below)
    sim.qr_state                            # none waiting scanned confirmed rejected expired
    sim.wait_qr(state, timeout=5.0) -> bool
    sim.scan(); sim.confirm(); sim.reject(); sim.expire()      # RuntimeError if no QR fits
    sim.inject_friend_message(sender, content) -> msg_id      # sender: friend uin or qq
    sim.inject_group_message(group, sender, content) -> msg_id
    sim.inject_discuss_message(discuss, sender, content) -> msg_id
    sim.inject_sess_message(via, source, sender, content) -> msg_id   # via "group"|"discuss"
    sim.inject_group_file(group, sender, filename) -> msg_id  # a group_web_message notice
    sim.inject_status(friend, status="online", client_type=1)
    sim.inject_poll(event)                  # any raw poll2 result element
    sim.kick(reason=...)                    # kick_message; the session dies when it is delivered
    sim.add_friend(**fields) / remove_friend(friend) / update_friend(friend, **fields)
    sim.add_group(**fields) / remove_group(group) / update_group(group, **fields)
    sim.add_member(group, **fields) / remove_member(group, member) / update_member(group, member, **fields)
    sim.add_discuss(**fields) / remove_discuss(discuss) / update_discuss(discuss, **fields)
    sim.add_discuss_member(discuss, **fields) / remove_discuss_member(discuss, member)
    sim.fault(path, count=1, retcode=None, status=None, delay=None, drop=False, body=None, extra=None)
    sim.configure(**knobs); sim.knobs
    sim.expire_session(); sim.clear()
    sim.sent, sim.admin_actions, sim.requests, sim.logins, sim.relinks, sim.logouts, sim.state()
    sim.session (the latest Session or None), sim.sessions (all of them, oldest first)

World objects: ``sim.world.user`` (qq, uin == qq, nick, name == nick, lnick, ...);
``.friends``, ``.groups``, ``.discusses`` and each ``group.members`` / ``discuss.members``
are Rosters: ordered, indexable (``friends[0]``), iterable, ``len()``, ``.get(ref)`` (None when
unknown); ``world.friend(ref)`` / ``group(ref)`` / ``discuss(ref)`` / ``member(group, ref)``
raise KeyError instead. ``group.owner`` is the owner Member, ``world.self_member(group)`` the
self account's Member. Field names are those of the schema below.

Content given to inject_* is a string or a list of segments: strings, ``["face", id]`` or
``["face", "微笑"]``; it arrives with the font element first. A reference to an entity is
the object itself or any of its ids as a number or numeric string: a friend or member by uin
or qq, a group by gid, code or qq (its group number), a discussion by did. Sends to a
target are recorded in ``sim.sent`` as ``{"endpoint", "r", "content" (parsed, font last),
"text", "target", "msg_id", "retcode", "delivered", "time"}`` (sess sends add "via" and
"source"); group administration in ``sim.admin_actions`` as ``{"action", "form", "group"
(number), "members" [qq...], "seconds", "ec", "time"}``; every request except /sim/ in
``sim.requests`` (bounded) as ``{"method", "path", "query", "form", "referer"}``. Change the
world through these methods (they keep the pre-serialised answers fresh), not by
assigning attributes.

HTTP control API on the same port: ``GET /sim/state|sent|admin_actions|requests|world``;
``POST /sim/<method>`` with a JSON object of keyword arguments for scan, confirm, reject,
expire, inject_*, kick, fault, configure, expire_session, clear and the add/remove/update
methods; answers ``{"ok": true, "result": ...}`` or HTTP 400 ``{"ok": false, "error": ...}``.

Knobs (keyword arguments, or sim.configure)
-------------------------------------------
    require_referer=True     API calls without a Referer get HTTP 403 {"retcode":100006}
    check_cookies=True       API calls need the session's skey cookie; getvfwebqq and
                             login2 the login's skey and p_skey (set by check_sig)
    check_ptwebqq=True       getvfwebqq and login2 need the ptwebqq that was issued
    require_online_buddies=True   poll2 answers 103 until get_online_buddies2 ran
    auth_retcode=103         answer to unknown psessionid/vfwebqq/cookies (or 100001)
    session_ttl=None         seconds; an older session answers 100012 to poll2 and sends
    idle="json"              idle poll2: json {"retcode":0,"retmsg":"ok","errmsg":"error"},
                             error {"errmsg":"error!!!","retcode":0}, 504 / 502 (HTTP),
                             100012 {"errmsg":"","retcode":100012}
    echo_group=False         the client's own group messages come back through poll2
    send_retcode=None        None: {"errCode":0,"msg":"send ok"}; N: {"errmsg":"error!!!","retcode":N}
                             (0 and 100100 count as delivered, anything else not)
    rate_limit=None          [count, seconds]: a send beyond count in the window answers 1202
    lenient_font=False       accept sent content whose last element is not the font
    logout_revokes=False     logout also revokes supertoken (no pt4_auth resume afterwards)
    poll_ack=False           a poll2 answer's events count as read only when the same session polls
                             again; those of a session replaced by a new login2 go first to the next
                             poll (a client killed with an answer unread loses nothing). Off, as
                             Tencent did: events answered once are gone
    max_requests=1000        how many requests sim.requests keeps (read at construction)

Events wait for the account between sessions: what arrives while no client polls (webqq stopped or
killed) goes to the next session's first poll2.

World schema (``--world FILE``, ``Simulator(world=dict)``, ``GET /sim/world``)
-----------------------------------------------------------------------------
Every field is optional; missing ids are allocated (session ids from 1e9 to 5e9, so some
exceed 2**32; all ids and numbers of a world are distinct), missing names are invented.

    {"user": {"qq", "nick", "lnick", "face", "gender", "birthday": "Y-M-D", "country",
              "province", "city", "email", "phone", "mobile", "occupation", "college",
              "homepage", "personal", "blood", "constel", "shengxiao", "vip_info", "allow"},
     "categories": [{"index": 0, "sort": 0, "name": "我的好友"}, ...],
     "friends": [{"uin", "qq", "nick", "markname", "category": <index>, "lnick", "birthday",
                  <person fields>}],
     "groups": [{"gid", "code", "qq": <group number>, "name", "markname", "memo", "fingermemo",
                 "createtime", "level", "face", "flag", "mask": 0|1|2, "max_member",
                 "members": [{"uin", "qq", "nick", "card", "role": "owner"|"admin"|"member",
                              "join_time", "last_speak_time", "level", "point",
                              "shutup_until", <person fields>}]}],
     "discusses": [{"did", "name", "owner": <member uin>, "members": [{"uin", "qq", "nick",
                    <person fields>}]}]}

Person fields: ``gender`` ("male"/"female"), ``face``, ``status`` (online away busy silent
callme hidden offline), ``client_type`` (1 pc, 21 mobile, 24 iphone, 41 web), ``country``,
``province``, ``city``, ``is_vip``, ``vip_level``. ``name`` is accepted for ``nick``. The
self account (uin == qq == user.qq) is a member of every group and discussion; it is added
when missing. A member whose uin or qq is a friend's takes the friend's identity. Instead of
a world, ``world`` may be a generator spec ``{"friends": N, "groups": M, "members": K,
"discusses": D, "seed": S}`` (see World.generate).
"""

import argparse
import collections
import gc
import html
import itertools
import json
import logging
import os
import random
import re
import secrets
import socket
import string
import struct
import sys
import threading
import time
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from webqq import (APPID, FACE_IDS, STATE_CODES, TrackedHTTPServer, bkn, friend_hash,  # noqa: E402
                   hash33, json_dumps, time33, to_int)

log = logging.getLogger("smartqq_sim")

###############################################################################
# 1. Constants
###############################################################################

FONT = ["font", {"size": 10, "color": "000000", "style": [0, 0, 0], "name": "微软雅黑"}]
CHECK_SIG = "http://ptlogin4.web2.qq.com/check_sig"
PROXY_URL = "http://w.qq.com/proxy.html?login2qq=1&webqq_type=10"
S_URL = "http%3A%2F%2Fw.qq.com%2Fproxy.html%3Flogin2qq%3D1%26webqq_type%3D10"
PSESSION_PREFIX = "8368046764001d636f6e6e7365727665725f77656271714031302e3133332e34312e383400001ad0"
JSON_TYPE = "application/json; charset=utf-8"
JS_TYPE = "application/javascript; charset=utf-8"
EPOCH = "Thu, 01 Jan 1970 00:00:00 GMT"

ALNUM = string.ascii_letters + string.digits
STATUSES = ("online", "away", "busy", "silent", "callme", "hidden", "offline")
STAT = {name: code for code, name in STATE_CODES.items()}
QR_STATES = ("none", "waiting", "scanned", "confirmed", "rejected", "expired")
# ptqrlogin answers: QR state -> (code, message); a bad ptqrtoken gets QR_ERROR.
PTUI = {"waiting": ("66", "二维码未失效。"), "scanned": ("67", "二维码认证中。"),
        "confirmed": ("0", "登录成功！"), "rejected": ("68", "本次登录已被拒绝。"),
        "expired": ("65", "二维码已失效。")}
QR_ERROR = ("10006", "二维码校验失败，请刷新后重试。")

# qun.qq.com / qinfo.clt.qq.com error codes (ec): the real meanings are not documented.
EC_BKN, EC_DENIED, EC_BAD, EC_MISSING = 1, 3, 4, 11
BAD_REQUEST = 100006        # retcode for malformed requests, unknown targets and bad signatures
MSG_TYPES = {"message": 0, "group_message": 4, "discu_message": 5, "sess_message": 140}
LEVEL_NAMES = ("潜水", "冒泡", "吐槽", "活跃", "话唠", "传说")
ROLE_CODES = {"owner": 0, "admin": 1, "member": 2}      # qun.qq.com's member roles
PROFILE_TEXTS = ("occupation", "phone", "mobile", "email", "college", "homepage", "personal")
IDENTITY = ("uin", "qq", "nick", "gender", "face", "status", "client_type", "province", "city", "is_vip",
            "vip_level")         # what a member copies from the friend (or stranger) it is
PROFILE_KEYS = frozenset(("nick", "gender", "province", "city", "face", "is_vip", "vip_level"))
RECENT_KINDS = {"send_buddy_msg2": 0, "send_qun_msg2": 1, "send_discu_msg2": 2}

KNOBS = {
    "require_referer": True, "check_cookies": True, "check_ptwebqq": True,
    "require_online_buddies": True, "auth_retcode": 103, "session_ttl": None, "idle": "json",
    "echo_group": False, "send_retcode": None, "rate_limit": None, "lenient_font": False,
    "logout_revokes": False, "poll_ack": False, "max_requests": 1000,
}
IDLE_ANSWERS = {"json": {"retcode": 0, "retmsg": "ok", "errmsg": "error"},
                "error": {"errmsg": "error!!!", "retcode": 0},
                "100012": {"errmsg": "", "retcode": 100012}}

# Plausible people, places and groups for the generator.
SURNAMES = ("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程"
            "苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝")
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超兰霞平刚华建文辉玲丹萍鹏宇浩然涵欣怡轩思雨晨阳鸣琪萱俊嘉志海燕春梅晓东博佑瑶曦婷颖"
NICKNAMES = ("清风徐来", "追梦人", "夏天的风", "木子", "小鱼儿", "阿杰", "糖果", "浅笑", "Sunny", "Leo", "南山南",
             "一只猫", "向日葵", "陌上花开", "半夏", "星辰大海", "柠檬不萌", "老王", "胖虎", "大白", "Kevin", "Vivian",
             "旅行者", "深海", "晴天", "时光", "北极熊", "橙子", "小太阳", "听雨", "Alice", "Tony", "简单", "路人甲")
SIGNATURES = ("", "", "今天也要加油鸭", "人生若只如初见", "Stay hungry, stay foolish", "忙，勿扰", "心若向阳，无畏悲伤",
              "好好学习，天天向上", "在路上", "代码改变世界", "慢慢来，比较快", "且听风吟")
PLACES = (("广东", "深圳"), ("广东", "广州"), ("北京", "海淀"), ("上海", "浦东"), ("浙江", "杭州"), ("四川", "成都"),
          ("湖北", "武汉"), ("江苏", "南京"), ("陕西", "西安"), ("湖南", "长沙"), ("山东", "青岛"), ("福建", "厦门"))
CATEGORIES = ("我的好友", "朋友", "家人", "同学", "同事")
GROUP_NAMES = ("{city}{topic}交流群", "{topic}爱好者", "{city}{topic}{n}群", "{school}{year}级{n}班", "{topic}技术讨论",
               "{surname}氏宗亲会", "{city}老乡会", "{company}项目组", "{topic}学习打卡")
TOPICS = ("Python", "摄影", "跑步", "读书", "Linux", "前端", "考研", "英语角", "骑行", "羽毛球", "美食", "游戏", "租房", "Go语言")
SCHOOLS = ("计算机", "软件工程", "电子信息", "机械", "数学", "经管")
COMPANIES = ("鹅厂", "星辰科技", "云帆网络", "蓝海数据", "飞鱼互娱")
MEMOS = ("", "欢迎新人，请改名片：城市-昵称", "禁止广告，违者踢", "每周五晚八点分享")
DISCUSS_NAMES = ("周末聚餐", "旅行计划", "毕业设计讨论", "装修群聊", "项目临时讨论", "生日惊喜策划", "年会节目")

# The demo world (`python webqq.py --demo`, and this simulator without world options): fixed, so that the
# examples of README.md and docs/ work as written; docs/simulator.md lists it.
DEMO_WORLD = {
    "user": {"qq": 123456, "nick": "小灰", "gender": "male", "province": "北京", "city": "海淀"},
    "categories": [{"index": 0, "sort": 0, "name": "我的好友"}, {"index": 1, "sort": 1, "name": "同事"}],
    "friends": [
        {"uin": 3016291473, "qq": 271027252, "nick": "alice", "gender": "female", "status": "online"},
        {"uin": 2879532466, "qq": 456790, "nick": "bob", "category": 1, "status": "away"},
        {"uin": 2372835507, "qq": 456789, "nick": "灰灰", "status": "online"},
        {"uin": 1873942551, "qq": 345678, "nick": "李雷", "category": 1, "status": "busy"},
        {"uin": 2201547760, "qq": 345679, "nick": "韩梅梅", "markname": "梅梅", "status": "offline"},
    ],
    "groups": [
        {"gid": 2617047292, "code": 3947221093, "qq": 67890, "name": "PERL学习交流", "memo": "每周五晚八点分享",
         "members": [{"qq": 123456, "role": "owner"}, {"uin": 1873942551, "role": "admin", "card": "雷雷"},
                     {"uin": 2372835507, "card": "灰灰-北京"}, {"uin": 2879532466},
                     {"uin": 1642085336, "qq": 567890, "nick": "王五", "card": "广告位招租"}]},
        {"gid": 2950374821, "code": 3120498876, "qq": 67891, "name": "webqq 用户群",
         "members": [{"uin": 3016291473, "role": "owner"}, {"qq": 123456, "role": "admin"}, {"uin": 2201547760},
                     {"uin": 1873942551}]},
    ],
    "discusses": [
        {"did": 3180912847, "name": "周末爬山", "members": [{"uin": 3016291473}, {"uin": 2879532466},
                                                          {"uin": 2201547760}]},
    ],
}

###############################################################################
# 2. QR code and PNG
###############################################################################

# ISO/IEC 18004 tables for error-correction level M, indexed by version (1..40).
QR_ECC_PER_BLOCK = (0, 10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26, 26,
                    26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28)
QR_BLOCKS = (0, 1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17, 17, 18, 20, 21,
             23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49)


def _gf_tables():
    """Exponent and logarithm tables of GF(256) with the QR polynomial x^8+x^4+x^3+x^2+1."""
    exp, logs = [0] * 512, [0] * 256
    x = 1
    for i in range(255):
        exp[i], logs[x] = x, i
        x <<= 1
        if x & 0x100:
            x ^= 0x11D
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, logs


GF_EXP, GF_LOG = _gf_tables()


def rs_remainder(data, degree):
    """The Reed-Solomon error-correction codewords of data (generator roots a^0..a^(degree-1))."""
    gen = [1]
    for i in range(degree):
        nxt = [0] * (len(gen) + 1)
        for j, coef in enumerate(gen):
            nxt[j] ^= coef
            if coef:
                nxt[j + 1] ^= GF_EXP[GF_LOG[coef] + i]
        gen = nxt
    rem = list(data) + [0] * degree
    for i in range(len(data)):
        if rem[i]:
            lead = GF_LOG[rem[i]]
            for j in range(1, degree + 1):
                if gen[j]:
                    rem[i + j] ^= GF_EXP[lead + GF_LOG[gen[j]]]
    return rem[len(data):]


def qr_raw_codewords(version):
    """How many 8-bit codewords fit a version once the function patterns are placed."""
    bits = (16 * version + 128) * version + 64
    if version >= 2:
        n = version // 7 + 2
        bits -= (25 * n - 10) * n - 55
        if version >= 7:
            bits -= 36
    return bits // 8


def qr_data_codewords(version):
    """Data codewords of a version at level M."""
    return qr_raw_codewords(version) - QR_ECC_PER_BLOCK[version] * QR_BLOCKS[version]


def qr_alignment_positions(version):
    """Row/column centres of the alignment patterns."""
    if version == 1:
        return []
    n, size = version // 7 + 2, version * 4 + 17
    step = 26 if version == 32 else (version * 4 + n * 2 + 1) // (n * 2 - 2) * 2
    return [6] + [size - 7 - i * step for i in range(n - 1)][::-1]


class QRCode(object):
    """A byte-mode QR code at level M, smallest version that fits: .size and .dark[row][col]."""

    MASKS = (lambda r, c: (r + c) % 2 == 0, lambda r, c: r % 2 == 0, lambda r, c: c % 3 == 0,
             lambda r, c: (r + c) % 3 == 0, lambda r, c: (r // 2 + c // 3) % 2 == 0,
             lambda r, c: r * c % 2 + r * c % 3 == 0, lambda r, c: (r * c % 2 + r * c % 3) % 2 == 0,
             lambda r, c: ((r + c) % 2 + r * c % 3) % 2 == 0)

    def __init__(self, data, mask=None):
        if isinstance(data, str):
            data = data.encode("utf-8")
        for version in range(1, 41):
            count_bits = 8 if version < 10 else 16
            if 4 + count_bits + 8 * len(data) <= 8 * qr_data_codewords(version):
                break
        else:
            raise ValueError("too long for a QR code: %d bytes" % len(data))
        self.version, self.size = version, version * 4 + 17
        self.dark = [[False] * self.size for _ in range(self.size)]
        self.reserved = [[False] * self.size for _ in range(self.size)]
        self._function_patterns()
        self._place(self._codewords(data, count_bits))
        if mask is None:
            mask = min(range(8), key=lambda m: self._penalty(self._masked(m)))
        self.mask = mask
        self.dark = self._masked(mask)

    def _set(self, r, c, dark):
        self.dark[r][c], self.reserved[r][c] = dark, True

    def _function_patterns(self):
        size = self.size
        for i in range(size):
            self._set(6, i, i % 2 == 0)
            self._set(i, 6, i % 2 == 0)
        for r0, c0 in ((0, 0), (0, size - 7), (size - 7, 0)):
            for dr in range(-1, 8):
                for dc in range(-1, 8):
                    if 0 <= r0 + dr < size and 0 <= c0 + dc < size:
                        ring = max(abs(dr - 3), abs(dc - 3))
                        self._set(r0 + dr, c0 + dc, ring not in (2, 4))
        pos = qr_alignment_positions(self.version)
        corners = {(6, 6), (6, size - 7), (size - 7, 6)}
        for r in pos:
            for c in pos:
                if (r, c) not in corners:
                    for dr in range(-2, 3):
                        for dc in range(-2, 3):
                            self._set(r + dr, c + dc, max(abs(dr), abs(dc)) != 1)
        self._format_bits(0)
        if self.version >= 7:
            rem = self.version
            for _ in range(12):
                rem = (rem << 1) ^ ((rem >> 11) * 0x1F25)
            bits = self.version << 12 | rem
            for i in range(18):
                a, b = size - 11 + i % 3, i // 3
                self._set(a, b, (bits >> i) & 1 == 1)
                self._set(b, a, (bits >> i) & 1 == 1)

    def _format_bits(self, mask):
        """Level M (00) and the mask, BCH(15,5)-protected, in both copies, plus the dark module."""
        size, rem = self.size, mask
        for _ in range(10):
            rem = (rem << 1) ^ ((rem >> 9) * 0x537)
        bits = (mask << 10 | rem) ^ 0x5412
        for i in range(15):
            bit = (bits >> i) & 1 == 1
            if i < 6:
                self._set(i, 8, bit)
            elif i < 8:
                self._set(i + 1, 8, bit)
            elif i == 8:
                self._set(8, 7, bit)
            else:
                self._set(8, 14 - i, bit)
            if i < 8:
                self._set(8, size - 1 - i, bit)
            else:
                self._set(size - 15 + i, 8, bit)
        self._set(size - 8, 8, True)

    def _codewords(self, data, count_bits):
        """Mode, count, data, terminator and pad codewords, split in blocks, ECC added, interleaved."""
        bits = [0, 1, 0, 0] + [(len(data) >> i) & 1 for i in range(count_bits - 1, -1, -1)]
        for byte in data:
            bits.extend((byte >> i) & 1 for i in range(7, -1, -1))
        capacity = qr_data_codewords(self.version)
        bits.extend([0] * min(4, capacity * 8 - len(bits)))
        bits.extend([0] * (-len(bits) % 8))
        words = [int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8)]
        words.extend(itertools.islice(itertools.cycle((0xEC, 0x11)), capacity - len(words)))
        nblocks, ecc = QR_BLOCKS[self.version], QR_ECC_PER_BLOCK[self.version]
        raw = qr_raw_codewords(self.version)
        short, nshort = raw // nblocks - ecc, nblocks - raw % nblocks
        blocks, start = [], 0
        for i in range(nblocks):
            n = short + (i >= nshort)
            blocks.append(words[start:start + n])
            start += n
        eccs = [rs_remainder(block, ecc) for block in blocks]
        out = [block[i] for i in range(short + 1) for block in blocks if i < len(block)]
        return out + [e[i] for i in range(ecc) for e in eccs]

    def _place(self, words):
        """The zigzag of two-module columns from the bottom right, skipping the timing column."""
        size, i, total = self.size, 0, len(words) * 8
        right = size - 1
        while right >= 1:
            if right == 6:
                right = 5
            upward = (right + 1) & 2 == 0
            for vert in range(size):
                r = size - 1 - vert if upward else vert
                for c in (right, right - 1):
                    if not self.reserved[r][c] and i < total:
                        self.dark[r][c] = (words[i >> 3] >> (7 - (i & 7))) & 1 == 1
                        i += 1
            right -= 2

    def _masked(self, mask):
        self._format_bits(mask)
        test = self.MASKS[mask]
        return [[dark != (not fixed and test(r, c)) for c, (dark, fixed) in enumerate(zip(row, frow))]
                for r, (row, frow) in enumerate(zip(self.dark, self.reserved))]

    @staticmethod
    def _penalty(grid):
        """The ISO penalty: long runs, 2x2 blocks, finder look-alikes, dark/light imbalance."""
        size = len(grid)
        rows = ["".join("1" if dark else "0" for dark in row) for row in grid]
        score = 0
        for line in rows + ["".join(col) for col in zip(*rows)]:
            score += sum(len(m.group()) - 2 for m in re.finditer(r"0{5,}|1{5,}", line))
            score += 40 * len(re.findall(r"(?=10111010000|00001011101)", "0000" + line + "0000"))
        for a, b in zip(rows, rows[1:]):
            score += 3 * sum(1 for c in range(size - 1) if a[c] == a[c + 1] == b[c] == b[c + 1])
        dark = sum(row.count("1") for row in rows)
        return score + 10 * (abs(dark * 20 - size * size * 10) // (size * size))

    def png(self, scale=3, quiet=2):
        """An 8-bit grayscale PNG: scale pixels per module, a quiet zone of quiet modules."""
        width = (self.size + 2 * quiet) * scale
        margin = b"\xff" * (quiet * scale)
        blank = b"\x00" + b"\xff" * width
        raw = [blank] * (quiet * scale)
        for row in self.dark:
            line = b"\x00" + margin + b"".join((b"\x00" if d else b"\xff") * scale for d in row) + margin
            raw.extend([line] * scale)
        raw.extend([blank] * (quiet * scale))
        header = struct.pack(">IIBBBBB", width, width, 8, 0, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                + png_chunk(b"IDAT", zlib.compress(b"".join(raw), 9)) + png_chunk(b"IEND", b""))


def png_chunk(kind, body):
    """One PNG chunk: length, kind, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


###############################################################################
# 3. World
###############################################################################


def declare(*fields):
    """Class decorator: add (name, default) fields to an Entity; defaults live on the class."""
    def apply(cls):
        cls.FIELDS = cls.FIELDS + fields
        cls.NAMES = frozenset(name for name, _ in cls.FIELDS)
        for name, default in fields:
            setattr(cls, name, default)
        return cls
    return apply


class Entity(object):
    """Base of the world's objects: declared fields (see declare), update and JSON out."""

    FIELDS, NAMES, IDS = (), frozenset(), ()

    def __init__(self, **fields):
        self.update(**fields)

    def update(self, **fields):
        if not self.NAMES.issuperset(fields):
            unknown = sorted(set(fields) - self.NAMES)
            raise TypeError("unknown %s field(s): %s" % (type(self).__name__, ", ".join(unknown)))
        self.__dict__.update(fields)

    def ids(self):
        return [getattr(self, name) for name in self.IDS]

    def to_json(self):
        return {name: getattr(self, name) for name, _ in self.FIELDS}

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, " ".join("%s=%s" % (n, getattr(self, n)) for n in self.IDS))


@declare(("uin", None), ("qq", None), ("nick", ""), ("gender", "male"), ("face", 0), ("status", "offline"),
         ("client_type", 1), ("country", "中国"), ("province", ""), ("city", ""), ("is_vip", 0), ("vip_level", 0))
class Person(Entity):
    """Someone with a session uin and a real QQ number; .name is an alias of .nick."""

    IDS = ("uin", "qq")

    @property
    def name(self):
        return self.nick


@declare(("markname", ""), ("category", 0), ("lnick", ""), ("birthday", "1990-01-01"))
class Friend(Person):
    """A friend: a person with a markname, a category index, a signature and a birthday."""


@declare(("card", ""), ("role", "member"), ("join_time", 0), ("last_speak_time", 0), ("level", 1), ("point", 0),
         ("shutup_until", 0))
class Member(Person):
    """A group member: card, role (owner/admin/member), times, level and shut-up deadline."""


class DiscussMember(Person):
    """A discussion member (its qq is the protocol's ruin)."""


@declare(("qq", None), ("nick", ""), ("lnick", ""), ("face", 0), ("gender", "male"), ("birthday", "1990-01-01"),
         ("country", "中国"), ("province", ""), ("city", ""), ("email", ""), ("phone", ""), ("mobile", ""),
         ("occupation", ""), ("college", ""), ("homepage", ""), ("personal", ""), ("blood", 0), ("constel", 0),
         ("shengxiao", 0), ("vip_info", 0), ("allow", 1))
class User(Entity):
    """The self account: uin == qq, plus the profile get_self_info2 reports."""

    IDS = ("qq",)

    @property
    def uin(self):
        return self.qq

    @property
    def name(self):
        return self.nick


class Roster(object):
    """An ordered list of entities with a lookup by any of their ids (numbers or numeric strings)."""

    def __init__(self):
        self.items = []
        self._ids = {}

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def get(self, ref):
        """The entity ref names (an entity, or one of its ids), or None."""
        if isinstance(ref, Entity):
            return ref if self._ids.get(ref.ids()[0]) is ref else None
        number = to_int(ref)
        return None if number is None else self._ids.get(number)

    def by(self, field, ref):
        """The entity whose field equals ref (ids of the other kinds do not match)."""
        obj = self.get(ref)
        return obj if obj is not None and getattr(obj, field) == to_int(ref) else None

    def add(self, obj):
        self.items.append(obj)
        self._index(obj)
        return obj

    def remove(self, obj):
        self.items.remove(obj)
        self._unindex(obj)

    def update(self, obj, **fields):
        self._unindex(obj)
        try:
            obj.update(**fields)
        finally:
            self._index(obj)

    def _index(self, obj):
        for name in obj.IDS:
            key = getattr(obj, name)
            if key is not None:
                self._ids[key] = obj

    def _unindex(self, obj):
        for key in obj.ids():
            if self._ids.get(key) is obj:
                del self._ids[key]


class Party(Entity):
    """An entity with members (a Roster): the base of Group and Discuss."""

    def __init__(self, **fields):
        Entity.__init__(self, **fields)
        self.members = Roster()

    def to_json(self, members=True):
        data = Entity.to_json(self)
        if members:
            data["members"] = [m.to_json() for m in self.members]
        return data


@declare(("gid", None), ("code", None), ("qq", None), ("name", ""), ("markname", ""), ("memo", ""),
         ("fingermemo", ""), ("createtime", 0), ("level", 0), ("face", 0), ("flag", 16777217), ("mask", 0),
         ("max_member", 500))
class Group(Party):
    """A group: gid (session id), code (for get_group_info_ext2), qq (group number), members."""

    IDS = ("gid", "code", "qq")

    @property
    def owner(self):
        return next((m for m in self.members if m.role == "owner"), None)


@declare(("did", None), ("name", ""), ("owner", None))
class Discuss(Party):
    """A discussion: did, name, owner (a member uin) and members."""

    IDS = ("did",)


class World(object):
    """The self account and its friends, groups and discussions; .version counts changes."""

    SESSION_IDS = (10 ** 9, 5 * 10 ** 9)
    QQ_NUMBERS = (10 ** 5, 3 * 10 ** 9)
    GROUP_NUMBERS = (10 ** 6, 10 ** 9)

    def __init__(self, user=None, categories=None, seed=None):
        self._rng = random.Random(seed)
        self._random = self._rng.random
        self._used = set()
        self.version = 0
        self.friends, self.groups, self.discusses = Roster(), Roster(), Roster()
        self.categories = [dict(c) for c in categories] if categories else [
            {"index": i, "sort": i, "name": name} for i, name in enumerate(CATEGORIES)]
        fields = dict(user or {})
        self._alias(fields)
        if fields.get("qq") is None:
            fields["qq"] = self.new_id(*self.QQ_NUMBERS)
        profile = self._profile()
        for name in ("gender", "province", "city", "face"):
            fields.setdefault(name, profile[name])
        fields["nick"] = fields.get("nick") or profile["nick"]
        fields.setdefault("lnick", self._pick(SIGNATURES))
        self._used.add(fields["qq"])
        self.user = User(**fields)

    def others(self, party):
        """The members of a group or discussion other than the account itself."""
        return [m for m in party.members if m.uin != self.user.uin]

    # -- ids and invented people --

    def _pick(self, seq):
        return seq[int(self._random() * len(seq))]

    def _between(self, lo, hi):
        return lo + int(self._random() * (hi - lo))

    def new_id(self, lo, hi):
        """A number in [lo, hi) that no entity of this world uses yet."""
        while True:
            n = self._between(lo, hi)
            if n not in self._used:
                self._used.add(n)
                return n

    def _claim(self, obj):
        for key in obj.ids():
            if key is not None:
                self._used.add(key)

    def _real_name(self):
        pick = self._pick
        return pick(SURNAMES) + pick(GIVEN) + (pick(GIVEN) if self._random() < 0.66 else "")

    def _profile(self):
        """Invented nick, gender, place, avatar and VIP level of a person."""
        rnd = self._random
        province, city = self._pick(PLACES)
        vip = self._between(1, 8) if rnd() < 0.2 else 0
        return {"nick": self._real_name() if rnd() < 0.55 else self._pick(NICKNAMES),
                "gender": "female" if rnd() < 0.5 else "male", "province": province, "city": city,
                "face": 3 * self._between(0, 200), "is_vip": int(vip > 0), "vip_level": vip}

    def _presence(self):
        """Invented online state: 45 % are online in some way."""
        if self._random() < 0.45:
            return {"status": self._pick(("online", "online", "online", "away", "busy", "callme", "silent")),
                    "client_type": self._pick((1, 1, 21, 24, 41))}
        return {"status": "offline", "client_type": 1}

    @staticmethod
    def _alias(fields):
        if "name" in fields:
            fields.setdefault("nick", fields.pop("name"))

    def self_identity(self):
        """The person fields of the self account as a member of a group or discussion."""
        u = self.user
        return {"uin": u.qq, "qq": u.qq, "nick": u.nick, "gender": u.gender, "face": u.face, "status": "online",
                "province": u.province, "city": u.city}

    def _identity(self, fields, known):
        """The person fields of self or of a known person (a friend) that fields' uin or qq names."""
        for ref in (fields.get("uin"), fields.get("qq")):
            if ref is None:
                continue
            if ref == self.user.qq:
                return self.self_identity()
            for roster in known:
                other = roster.get(ref)
                if other is not None:
                    return {name: getattr(other, name) for name in IDENTITY}
        return {}

    def _person(self, fields, known=()):
        """A person's fields completed: the identity of self or a known person it names, else invented."""
        self._alias(fields)
        for name in ("uin", "qq"):
            if fields.get(name) is not None:
                fields[name] = to_int(fields[name])
        for name, value in self._identity(fields, known).items():
            fields.setdefault(name, value)
        if fields.get("uin") is None:
            fields["uin"] = self.new_id(*self.SESSION_IDS)
        if fields.get("qq") is None:
            fields["qq"] = self.new_id(*self.QQ_NUMBERS)
        if not fields.get("nick") or not PROFILE_KEYS.issubset(fields):
            profile = self._profile()
            for name, value in profile.items():
                fields.setdefault(name, value)
            fields["nick"] = fields.get("nick") or profile["nick"]
        return fields

    def changed(self):
        """Count a change (the simulator re-serialises its cached answers)."""
        self.version += 1

    # -- lookups --

    def friend(self, ref):
        return self._find(self.friends, ref, "friend")

    def group(self, ref):
        return self._find(self.groups, ref, "group")

    def discuss(self, ref):
        return self._find(self.discusses, ref, "discuss")

    def member(self, group, ref):
        return self._find(self.group(group).members, ref, "member")

    def discuss_member(self, discuss, ref):
        return self._find(self.discuss(discuss).members, ref, "discuss member")

    @staticmethod
    def _find(roster, ref, what):
        obj = roster.get(ref)
        if obj is None:
            raise KeyError("no %s %r" % (what, ref))
        return obj

    def self_member(self, group):
        """The self account's Member in group, or None."""
        return group.members.get(self.user.qq)

    # -- changes --

    def add_friend(self, **fields):
        """Add a friend (fields of the schema; missing ones invented) and return it."""
        fields = self._person(dict(fields))
        fields.setdefault("lnick", self._pick(SIGNATURES))
        friend = Friend(**fields)
        if friend.category not in [c["index"] for c in self.categories]:
            raise ValueError("no category %r" % friend.category)
        if self.friends.get(friend.uin) is not None or self.friends.get(friend.qq) is not None:
            raise ValueError("%r is already a friend" % friend)
        self._claim(friend)
        self.friends.add(friend)
        self.changed()
        return friend

    def remove_friend(self, friend):
        self._remove(self.friends, friend, "friend")

    def update_friend(self, friend, **fields):
        return self._update(self.friends, friend, "friend", fields)

    def _remove(self, roster, ref, what):
        roster.remove(self._find(roster, ref, what))
        self.changed()

    def _update(self, roster, ref, what, fields):
        obj = self._find(roster, ref, what)
        if isinstance(obj, Person):
            self._alias(fields)
        roster.update(obj, **fields)
        self._claim(obj)
        self.changed()
        return obj

    def add_group(self, **fields):
        """Add a group with its members (list of member dicts); self joins if missing."""
        fields.setdefault("name", self._group_name())
        fields.setdefault("createtime", int(time.time()) - self._between(86400, 8 * 365 * 86400))
        group = self._add_party(self.groups, Group, Member, fields, (
            ("gid", self.SESSION_IDS), ("code", self.SESSION_IDS), ("qq", self.GROUP_NUMBERS)))
        if group.owner is None:
            group.members[0].role = "owner"
        self.changed()
        return group

    def remove_group(self, group):
        self._remove(self.groups, group, "group")

    def update_group(self, group, **fields):
        return self._update(self.groups, group, "group", fields)

    def add_member(self, group, **fields):
        """Add a member to a group (a friend's uin or qq brings the friend's identity)."""
        member = self._join(self.group(group), Member, fields)
        self.changed()
        return member

    def remove_member(self, group, member):
        self._remove(self.group(group).members, member, "member")

    def update_member(self, group, member, **fields):
        return self._update(self.group(group).members, member, "member", fields)

    def add_discuss(self, **fields):
        """Add a discussion with its members (list of member dicts); self joins if missing."""
        discuss = self._add_party(self.discusses, Discuss, DiscussMember, fields, (("did", self.SESSION_IDS),))
        if discuss.owner is None:
            discuss.owner = discuss.members[0].uin
        discuss.name = discuss.name or "、".join(m.nick for m in discuss.members[:3])
        self.changed()
        return discuss

    def remove_discuss(self, discuss):
        self._remove(self.discusses, discuss, "discuss")

    def update_discuss(self, discuss, **fields):
        return self._update(self.discusses, discuss, "discuss", fields)

    def add_discuss_member(self, discuss, **fields):
        """Add a member to a discussion (a friend's uin or qq brings the friend's identity)."""
        member = self._join(self.discuss(discuss), DiscussMember, fields)
        self.changed()
        return member

    def remove_discuss_member(self, discuss, member):
        self._remove(self.discuss(discuss).members, member, "discuss member")

    def _add_party(self, roster, cls, member_cls, fields, ids):
        """Add a group or discussion: ids allocated where missing, members joined, self included."""
        fields = dict(fields)
        members = fields.pop("members", [])
        for name, span in ids:
            fields[name] = self.new_id(*span) if fields.get(name) is None else to_int(fields[name])
        party = cls(**fields)
        self._claim(party)
        for member in members:
            self._join(party, member_cls, member)
        if party.members.get(self.user.qq) is None:
            self._join(party, member_cls, {"qq": self.user.qq})
        return roster.add(party)

    def _join(self, party, cls, fields):
        """Add a Member or DiscussMember made of fields to party."""
        fields = self._person(dict(fields), (self.friends,))
        if "join_time" in cls.NAMES:
            fields.setdefault("join_time", int(time.time()) - self._between(3600, 3 * 365 * 86400))
        member = cls(**fields)
        if party.members.get(member.uin) is not None:
            raise ValueError("%r is already a member of %r" % (member, party))
        self._claim(member)
        return party.members.add(member)

    # -- JSON and generation --

    def to_json(self):
        return {"user": self.user.to_json(), "categories": [dict(c) for c in self.categories],
                "friends": [f.to_json() for f in self.friends], "groups": [g.to_json() for g in self.groups],
                "discusses": [d.to_json() for d in self.discusses]}

    @classmethod
    def from_json(cls, data):
        """A World from the schema of the module docstring (or from a generator spec); what it
        leaves out is invented the same way on every load."""
        if any(isinstance(data.get(k), int) for k in ("friends", "groups", "members", "discusses", "seed")):
            return cls.generate(**data)
        world = cls(user=data.get("user"), categories=data.get("categories"), seed=0)
        for friend in data.get("friends", []):
            world.add_friend(**friend)
        for group in data.get("groups", []):
            world.add_group(**group)
        for discuss in data.get("discusses", []):
            world.add_discuss(**discuss)
        return world

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_json(json.load(f))

    @classmethod
    def demo(cls):
        """The demo world (DEMO_WORLD), served when nothing else is asked for."""
        return cls.from_json(DEMO_WORLD)

    def _group_name(self):
        pick = self._pick
        return pick(GROUP_NAMES).format(
            city=pick(PLACES)[1], topic=pick(TOPICS), n=self._between(1, 10), school=pick(SCHOOLS),
            year=self._between(10, 24), surname=pick(SURNAMES), company=pick(COMPANIES))

    @classmethod
    def generate(cls, friends=20, groups=3, members=30, discusses=2, seed=None):
        """A deterministic (for a seed) world: friends, groups of `members` people (self
        included; the self account owns the first group and administers the second),
        discussions of 3 to 8 people. Members are drawn from the friends and a pool of
        strangers, so people recur across groups with the same uin."""
        collecting = gc.isenabled()
        gc.disable()        # tens of thousands of new objects and no garbage: collecting only costs time
        try:
            return cls._generate(friends, groups, members, discusses, seed)
        finally:
            if collecting:
                gc.enable()

    @classmethod
    def _generate(cls, friends, groups, members, discusses, seed):
        world = cls(seed=seed)
        rnd, pick, between, new_id = world._random, world._pick, world._between, world.new_id
        now, ncat = int(time.time()), len(world.categories)
        for _ in range(friends):
            fields = world._profile()
            fields.update(world._presence())
            world.friends.add(Friend(
                uin=new_id(*cls.SESSION_IDS), qq=new_id(*cls.QQ_NUMBERS), lnick=pick(SIGNATURES),
                category=between(0, ncat) if rnd() < 0.7 else 0,
                markname=world._real_name() if rnd() < 0.25 else "",
                birthday="%d-%02d-%02d" % (between(1970, 2006), between(1, 13), between(1, 29)), **fields))
        pool = [{name: getattr(f, name) for name in IDENTITY} for f in world.friends]
        for _ in range(groups * members // 4):
            fields = world._profile()
            fields.update(world._presence(), uin=new_id(*cls.SESSION_IDS), qq=new_id(*cls.QQ_NUMBERS))
            pool.append(fields)
        me = world.self_identity()
        for index in range(groups):
            created = now - between(86400, 8 * 365 * 86400)
            group = world.groups.add(Group(
                gid=new_id(*cls.SESSION_IDS), code=new_id(*cls.SESSION_IDS), qq=new_id(*cls.GROUP_NUMBERS),
                name=world._group_name(), memo=pick(MEMOS), createtime=created, level=between(0, 6),
                max_member=pick((200, 500, 1000, 2000)), mask=pick((0, 0, 0, 0, 1, 2))))
            mine = "owner" if index == 0 else "admin" if index == 1 else pick(("owner", "admin", "member",
                                                                               "member", "member", "member"))
            group.members.add(Member(role=mine, join_time=created, **me))
            admins, age, add = between(1, 4), now - created, group.members.add
            for n, person in enumerate(world._rng.sample(pool, min(max(members - 1, 0), len(pool)))):
                role = "owner" if n == 0 and mine != "owner" else "admin" if n <= admins else "member"
                draw = rnd()
                card = "" if draw < 0.5 else world._real_name() if draw < 0.8 else "%s-%s" % (
                    pick(PLACES)[1], person["nick"])
                add(Member(role=role, card=card, join_time=created + int(rnd() * age),
                           last_speak_time=now - int(rnd() * 7776000), level=1 + int(rnd() * 6),
                           point=int(rnd() * 5000), **person))
        people = pool[:friends] or pool
        for _ in range(discusses):
            discuss = world.discusses.add(Discuss(did=new_id(*cls.SESSION_IDS), name=pick(DISCUSS_NAMES + ("",))))
            discuss.members.add(DiscussMember(**me))
            for person in world._rng.sample(people, min(between(2, 8), len(people))):
                discuss.members.add(DiscussMember(**person))
            discuss.owner = pick(discuss.members.items).uin
            discuss.name = discuss.name or "、".join(m.nick for m in discuss.members[:3])
        return world


###############################################################################
# 4. Login state
###############################################################################


def _token(alphabet, n):
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _uin_cookie(qq):
    return "o%010d" % qq


class QR(object):
    """One ptqrshow: the qrsig cookie, the state, its deadline and the Auth a confirm issued."""

    __slots__ = ("qrsig", "state", "expires", "auth")

    def __init__(self, ttl):
        self.qrsig = _token(ALNUM + "*-", 64)
        self.state = "waiting"
        self.expires = time.time() + ttl
        self.auth = None


class Auth(object):
    """The credentials one login (QR confirm or pt4_auth resume) issued to the self account."""

    def __init__(self, qq, ptwebqq=None, supertoken=None, superkey=None):
        self.qq = qq
        self.skey = "@" + _token(ALNUM, 9)
        self.ptwebqq = ptwebqq or secrets.token_hex(32)
        self.supertoken = supertoken or str(10 ** 9 + secrets.randbelow(3 * 10 ** 9))
        self.superkey = superkey or _token(ALNUM + "*-_", 44)
        self.ptsigx = secrets.token_hex(64)
        self.p_skey = _token(ALNUM + "*-_", 44)
        self.pt4_token = _token(ALNUM + "*-_", 44)
        self.vfwebqq = secrets.token_hex(40)
        self.checked = False     # check_sig was visited
        self.valid = True

    def check_sig_url(self):
        """The URL ptqrlogin hands out on success."""
        return ("%s?pttype=1&uin=%d&service=ptqrlogin&nodirect=0&ptsigx=%s&s_url=%s&f_url=&ptlang=2052"
                "&ptredirect=100&aid=%d&daid=164&j_later=0&low_login_hour=0&regmaster=0&pt_login_type=3"
                "&pt_aid=0&pt_aaid=16&pt_light=0&pt_3rd_aid=0" % (CHECK_SIG, self.qq, self.ptsigx, S_URL, APPID))

    def resume_url(self):
        """The URL pt4_auth hands out (Mojo appends regmaster, aid and s_url to it)."""
        return "%s?pttype=2&uin=%d&service=jump&nodirect=0&ptsigx=%s" % (CHECK_SIG, self.qq, self.ptsigx)

    def login_cookies(self, nick):
        """The cookies of a successful ptqrlogin (qq.com and ptlogin2.qq.com ones)."""
        uin = _uin_cookie(self.qq)
        return [("uin", uin), ("skey", self.skey), ("pt2gguin", uin), ("ptwebqq", self.ptwebqq),
                ("superuin", uin), ("superkey", self.superkey), ("supertoken", self.supertoken),
                ("ptcz", secrets.token_hex(32)), ("RK", _token(ALNUM, 10)), ("ptisp", "ctc"),
                ("pt_recent_uins", secrets.token_hex(48)), ("pt_guid_sig", secrets.token_hex(32)),
                ("ptnick_%d" % self.qq, nick.encode("utf-8").hex())]

    def web2_cookies(self):
        """The cookies check_sig sets."""
        uin = _uin_cookie(self.qq)
        return [("uin", uin), ("skey", self.skey), ("pt2gguin", uin), ("ptwebqq", self.ptwebqq),
                ("p_skey", self.p_skey), ("p_uin", uin), ("pt4_token", self.pt4_token)]


class Session(object):
    """One login2: psessionid, vfwebqq, ptwebqq, skey, status, registered (online buddies) and valid."""

    FIELDS = ("psessionid", "vfwebqq", "ptwebqq", "skey", "status", "registered", "valid", "created")

    def __init__(self, auth, status):
        self.psessionid = self.new_psessionid()
        self.vfwebqq, self.ptwebqq, self.skey = auth.vfwebqq, auth.ptwebqq, auth.skey
        self.status = status
        self.registered = False
        self.valid = True
        self.created = time.time()
        self.unread = []            # the events of the last poll2 answer, until the next poll2 (poll_ack)

    @staticmethod
    def new_psessionid():
        return PSESSION_PREFIX + secrets.token_hex(70)

    def to_json(self):
        return {name: getattr(self, name) for name in self.FIELDS}


class Fault(object):
    """What the next `count` requests to a path get instead of the normal answer."""

    __slots__ = ("count", "retcode", "status", "delay", "drop", "body", "extra")

    def __init__(self, count=1, retcode=None, status=None, delay=None, drop=False, body=None, extra=None):
        self.count, self.retcode, self.status, self.delay = count, retcode, status, delay
        self.drop, self.body, self.extra = drop, body, dict(extra or {})


###############################################################################
# 5. HTTP plumbing
###############################################################################


class Request(object):
    """One parsed request: path, query, form, cookies, Referer, the r-form JSON and all params."""

    def __init__(self, method, target, headers, body):
        url = urlsplit(target)
        self.method, self.path, self.body = method, url.path or "/", body
        self.query = _last_values(url.query)
        ctype = headers.get("Content-Type") or ""
        self.form = _last_values(body.decode("utf-8", "replace")) if body and "json" not in ctype else {}
        self.cookies = {}
        for header in headers.get_all("Cookie") or ():
            for part in header.split(";"):
                name, _, value = part.strip().partition("=")
                if name:
                    self.cookies[name] = value
        self.referer = headers.get("Referer") or ""
        raw = self.form.get("r", self.query.get("r"))
        try:
            self.r = json.loads(raw) if raw else None
        except ValueError:
            self.r = None
        self.params = dict(self.query)
        self.params.update(self.form)
        if isinstance(self.r, dict):
            self.params.update(self.r)

    def record(self):
        return {"method": self.method, "path": self.path, "query": self.query, "form": self.form,
                "referer": self.referer}


def _last_values(text):
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


class Response(object):
    """An HTTP answer: status, body bytes, content type and extra headers (cookies included)."""

    __slots__ = ("status", "body", "ctype", "headers")

    def __init__(self, body=b"", status=200, ctype="text/html; charset=utf-8"):
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        self.status, self.ctype, self.headers = status, ctype, []

    @classmethod
    def json(cls, obj, status=200):
        return cls(json_dumps(obj) + "\n", status, JSON_TYPE)

    def set_cookies(self, pairs):
        for name, value in pairs:
            self.headers.append(("Set-Cookie", "%s=%s; Path=/" % (name, value)))
        return self

    def del_cookies(self, names):
        for name in names:
            self.headers.append(("Set-Cookie", "%s=; Path=/; Expires=%s; Max-Age=0" % (name, EPOCH)))
        return self


DROP = object()     # a route's answer meaning: close the connection without answering


def status_page(status):
    """A bare HTML error page with that HTTP status, as a gateway sends."""
    return Response("<html><body><h1>%d %s</h1></body></html>" % (status, HTTPStatus(status).phrase), status)


def retcode(code, **extra):
    """The protocol's error envelope."""
    body = {"retcode": code, "errmsg": ""}
    body.update(extra)
    return Response.json(body)


class Handler(BaseHTTPRequestHandler):
    """One connection: reads requests, asks the Simulator for answers, writes them."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "smartqq-sim"
    sys_version = ""

    def do_GET(self):
        started = time.time()
        sim = self.server.sim
        try:
            length = int(self.headers.get("Content-Length") or 0)
            req = Request(self.command, self.path, self.headers, self.rfile.read(length) if length > 0 else b"")
            resp = sim.respond(req)
        except Exception as exc:  # every failure becomes a 500 answer, never a dead handler
            log.exception("smartqq_sim: %s %s failed", self.command, self.path)
            resp = Response.json({"retcode": 500, "errmsg": "simulator error: %s" % exc}, 500)
        if resp is DROP:
            self.close_connection = True
            log.debug("%s %s dropped", self.command, self.path)
            return
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.ctype)
            self.send_header("Content-Length", str(len(resp.body)))
            for name, value in resp.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(resp.body)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        log.debug("%s %s %d %.1f ms", self.command, self.path, resp.status, (time.time() - started) * 1000)

    do_POST = do_GET

    def log_message(self, fmt, *args):
        """Requests are logged by do_GET at debug level only."""


class Server(TrackedHTTPServer):
    """The listening socket, with a thread per connection that stop() can end."""

    name = "smartqq-sim"

    def __init__(self, address, sim):
        self.sim = sim
        TrackedHTTPServer.__init__(self, address, Handler)

    def handle_error(self, request, client_address):
        log.debug("smartqq_sim: connection from %s failed", client_address, exc_info=True)


###############################################################################
# 6. Routes: ptlogin (QR, check_sig, pt4_auth, logout) and pages
###############################################################################

PAGE = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>%s</title></head><body>"
        "<input type=\"hidden\" name=\"aid\" value=\"%d\" />"
        "<script>var g_login_sig=encodeURIComponent(\"%s\"),g_pt_version=encodeURIComponent(\"10233\"),"
        "g_mibao_css=encodeURIComponent(\"m_webqq\");</script></body></html>")


def ptui(code, message, url="", nick=""):
    """A ptqrlogin answer: six single-quoted arguments, the last after ', '."""
    return Response("ptuiCB('%s','0','%s','0','%s', '%s');\r\n" % (code, url, message, nick), ctype=JS_TYPE)


class LoginRoutes(object):
    """The ptlogin2 side: login pages, QR image and state, check_sig, pt4_auth and logout."""

    def _page(self, req):
        return Response(PAGE % ("WebQQ", APPID, ""))

    def _xlogin(self, req):
        sig = _token(ALNUM + "*-", 64)
        return Response(PAGE % ("QQ帐号安全登录", APPID, sig)).set_cookies([("pt_login_sig", sig)])

    def _ptqrshow(self, req):
        scale = max(1, min(20, to_int(req.query.get("s"), 3)))
        qr = self._qr = QR(self.qr_ttl)
        self._cond.notify_all()
        if self.auto_scan is not None:
            self._spawn("smartqq-sim-autoscan", self._auto_scan, qr)
        png = QRCode("http://txz.qq.com/p?k=%s&f=%d" % (qr.qrsig, APPID)).png(scale, 2)
        return Response(png, ctype="image/png").set_cookies([("qrsig", qr.qrsig)])

    def _auto_scan(self, qr):
        for allowed, state in ((("waiting",), "scanned"), (("waiting", "scanned"), "confirmed")):
            if self._stopping.wait(self.auto_scan / 2.0):
                return
            with self._cond:
                if self._qr is not qr or self._qr_state() not in allowed:
                    return
                self._set_qr_state(state)

    def _ptqrlogin(self, req):
        qrsig = req.cookies.get("qrsig")
        if not qrsig or to_int(req.query.get("ptqrtoken")) != hash33(qrsig):
            return ptui(*QR_ERROR)
        nonce = "(%d)" % secrets.randbelow(10 ** 10)
        qr = self._qr
        state = self._qr_state() if qr is not None and qr.qrsig == qrsig else "expired"
        code, message = PTUI[state]
        if state != "confirmed":
            return ptui(code, message + nonce)
        auth = qr.auth
        nick = self.world.user.nick
        return ptui(code, message, auth.check_sig_url(), nick).set_cookies(auth.login_cookies(nick))

    def _check_sig(self, req):
        auth = self._auth
        if (auth is None or not auth.valid or req.query.get("ptsigx") != auth.ptsigx
                or to_int(req.query.get("uin")) != auth.qq):
            return Response("<html><body>登录态校验失败 (ptsigx)</body></html>", 403)
        auth.checked = True
        resp = Response("<html><body>302 Found</body></html>", 302).set_cookies(auth.web2_cookies())
        resp.headers.append(("Location", PROXY_URL))
        return resp

    def _pt4_auth(self, req):
        token = req.cookies.get("supertoken", "")
        qq = self._supertokens.get(token)
        if qq is None or to_int(req.query.get("auth_token")) != time33(token):
            return Response("ptui_auth_CB('1','');", ctype=JS_TYPE)
        old = self._auth
        auth = Auth(qq, ptwebqq=old.ptwebqq if old else None, supertoken=token,
                    superkey=req.cookies.get("superkey") or None)
        self._grant(auth)
        return Response("ptui_auth_CB('0','%s');" % auth.resume_url(), ctype=JS_TYPE)

    def _logout(self, req):
        self.logouts += 1
        auth = self._auth
        if auth is not None and req.cookies.get("skey") == auth.skey:
            auth.valid = False
            if self.knobs["logout_revokes"]:
                self._supertokens.pop(auth.supertoken, None)
            if self.session is not None:
                self.session.valid = False
            self._cond.notify_all()
        return Response("pt_logout.ret(0, 'qq.com');", ctype=JS_TYPE).del_cookies(
            ("uin", "skey", "pt2gguin", "ptwebqq", "p_skey", "p_uin", "pt4_token"))


###############################################################################
# 7. Routes: login2 and the contact APIs
###############################################################################


class ContactRoutes(object):
    """getvfwebqq, login2 (also relink) and the s.web2 / d1.web2 contact APIs."""

    def _login_auth(self, req, ptwebqq):
        """The current Auth if the request carries its cookies (and ptwebqq), else None."""
        auth, knobs = self._auth, self.knobs
        if auth is None or not auth.valid or not auth.checked:
            return None
        if knobs["check_cookies"] and (req.cookies.get("skey") != auth.skey
                                       or req.cookies.get("p_skey") != auth.p_skey):
            return None
        if knobs["check_ptwebqq"] and ptwebqq != auth.ptwebqq:
            return None
        return auth

    def _getvfwebqq(self, req):
        auth = self._login_auth(req, req.query.get("ptwebqq"))
        if auth is None:
            return retcode(self.knobs["auth_retcode"])
        return Response.json({"retcode": 0, "result": {"vfwebqq": auth.vfwebqq}})

    def _login2(self, req):
        r = req.r if isinstance(req.r, dict) else {}
        status = r.get("status") if r.get("status") in STATUSES else "online"
        auth = self._login_auth(req, r.get("ptwebqq"))
        if auth is None:
            return retcode(self.knobs["auth_retcode"])
        psessionid = r.get("psessionid") or ""
        session = self.session
        if psessionid:
            if session is None or not session.valid or psessionid != session.psessionid:
                return retcode(self.knobs["auth_retcode"])
            session.psessionid, session.status = Session.new_psessionid(), status
            self.relinks += 1
        else:
            if session is not None:
                session.valid = False
                self._events.extendleft(reversed(session.unread))     # poll_ack: never read, so not lost
                session.unread = []
            session = Session(auth, status)
            self.sessions.append(session)
            self.logins += 1
        self._cond.notify_all()
        return Response.json({"retcode": 0, "result": {
            "cip": 23600812, "f": 0, "index": 1075, "port": 47450, "psessionid": session.psessionid,
            "status": status, "uin": auth.qq, "user_state": 0, "vfwebqq": session.vfwebqq}})

    def _session_for(self, req, need=(), late=None):
        """(live session, None) if the request's credentials name it, else (None, error answer)."""
        code = self.knobs["auth_retcode"]
        session = self.session
        if session is None or not session.valid:
            return None, retcode(code)
        for name in ("vfwebqq", "psessionid"):
            value = req.params.get(name)
            value = "" if value is None else str(value)
            if (name in need or value) and value != getattr(session, name):
                return None, retcode(code)
        if self.knobs["check_cookies"] and req.cookies.get("skey") != session.skey:
            return None, retcode(code)
        ttl = self.knobs["session_ttl"]
        if ttl is not None and time.time() - session.created > ttl:
            return None, retcode(late or code)
        return session, None

    def _cached(self, key, build):
        """The JSON answer for key, built once per world version (big lists are pre-serialised)."""
        if self._cache_version != self.world.version:
            self._cache.clear()
            self._cache_version = self.world.version
        body = self._cache.get(key)
        if body is None:
            body = self._cache[key] = (json_dumps({"retcode": 0, "result": build()}) + "\n").encode("utf-8")
        return Response(body, ctype=JSON_TYPE)

    @staticmethod
    def _profile(person, **extra):
        """The profile fields of get_self_info2 / get_friend_info2 (empty where the world has none)."""
        year, month, day = (to_int(x, 0) for x in (person.birthday.split("-") + ["0", "0"])[:3])
        data = {"face": person.face, "birthday": {"year": year, "month": month, "day": day}, "uin": person.uin,
                "nick": person.nick, "gender": person.gender, "country": person.country,
                "province": person.province, "city": person.city, "allow": 1, "blood": 0, "constel": 0,
                "shengxiao": 0, "vip_info": 0}
        data.update(dict.fromkeys(PROFILE_TEXTS, ""))
        data.update(extra)
        return data

    def _self_info(self, req):
        session, error = self._session_for(req)
        if error:
            return error
        u = self.world.user
        extra = {name: getattr(u, name) for name in PROFILE_TEXTS + ("allow", "blood", "constel", "shengxiao",
                                                                       "vip_info")}
        return Response.json({"retcode": 0, "result": self._profile(
            u, account=u.qq, lnick=u.lnick, vfwebqq=session.vfwebqq, stat=STAT.get(session.status), **extra)})

    def _hash_ok(self, req, session):
        return req.params.get("hash") == friend_hash(self.world.user.qq, session.ptwebqq)

    def _user_friends(self, req):
        session, error = self._session_for(req, ("vfwebqq",))
        if error:
            return error
        if not self._hash_ok(req, session):
            return retcode(50)
        return self._cached("friends", self._friends_result)

    def _friends_result(self):
        friends, marknames, vipinfo, info = [], [], [], []
        for f in self.world.friends:
            flag = f.category * 4
            friends.append({"flag": flag, "uin": f.uin, "categories": f.category})
            if f.markname:
                marknames.append({"uin": f.uin, "markname": f.markname, "type": 0})
            vipinfo.append({"vip_level": f.vip_level, "u": f.uin, "is_vip": f.is_vip})
            info.append({"face": f.face, "flag": flag, "nick": f.nick, "uin": f.uin})
        categories = [c for c in self.world.categories if not (c["index"] == 0 and c["name"] == CATEGORIES[0])]
        return {"friends": friends, "marknames": marknames, "categories": categories, "vipinfo": vipinfo,
                "info": info}

    def _online_buddies(self, req):
        session, error = self._session_for(req, ("vfwebqq", "psessionid"))
        if error:
            return error
        session.registered = True
        return self._cached("online", lambda: [
            {"client_type": f.client_type, "status": f.status, "uin": f.uin}
            for f in self.world.friends if f.status != "offline"])

    def _group_list(self, req):
        session, error = self._session_for(req, ("vfwebqq",))
        if error:
            return error
        if not self._hash_ok(req, session):
            return retcode(50)
        groups = self.world.groups
        return self._cached("groups", lambda: {
            "gnamelist": [{"flag": g.flag, "name": g.name, "gid": g.gid, "code": g.code} for g in groups],
            "gmarklist": [{"uin": g.gid, "markname": g.markname} for g in groups if g.markname],
            "gmasklist": [{"gid": g.gid, "mask": g.mask} for g in groups if g.mask]})

    def _group_info(self, req):
        error = self._session_for(req, ("vfwebqq",))[1]
        if error:
            return error
        group = self.world.groups.by("code", req.params.get("gcode"))
        if group is None:
            return retcode(6)
        return self._cached(("group", group.code), lambda: self._group_info_result(group))

    @staticmethod
    def _group_info_result(g):
        owner, members = g.owner, g.members
        return {
            "ginfo": {"gid": g.gid, "code": g.code, "name": g.name, "memo": g.memo, "fingermemo": g.fingermemo,
                      "createtime": g.createtime, "level": g.level, "owner": owner.uin if owner else 0,
                      "flag": g.flag, "option": 2, "class": 10011, "face": g.face,
                      "members": [{"muin": m.uin, "mflag": int(m.role == "admin")} for m in members]},
            "minfo": [{"uin": m.uin, "nick": m.nick, "gender": m.gender, "country": m.country,
                       "province": m.province, "city": m.city} for m in members],
            "stats": [{"uin": m.uin, "client_type": m.client_type, "stat": STAT.get(m.status, 10)}
                      for m in members if m.status != "offline"],
            "cards": [{"muin": m.uin, "card": m.card} for m in members if m.card],
            "vipinfo": [{"u": m.uin, "is_vip": m.is_vip, "vip_level": m.vip_level} for m in members]}

    def _discus_list(self, req):
        error = self._session_for(req, ("vfwebqq", "psessionid"))[1]
        if error:
            return error
        return self._cached("discusses", lambda: {
            "dnamelist": [{"name": d.name, "did": d.did} for d in self.world.discusses]})

    def _discu_info(self, req):
        error = self._session_for(req, ("vfwebqq", "psessionid"))[1]
        if error:
            return error
        d = self.world.discusses.get(req.params.get("did"))
        if d is None:
            return retcode(BAD_REQUEST)
        return self._cached(("discuss", d.did), lambda: {
            "info": {"did": d.did, "discu_name": d.name, "discu_owner": d.owner,
                     "mem_list": [{"mem_uin": m.uin, "ruin": m.qq} for m in d.members]},
            "mem_info": [{"uin": m.uin, "nick": m.nick} for m in d.members],
            "mem_status": [{"uin": m.uin, "status": m.status, "client_type": m.client_type}
                           for m in d.members if m.status != "offline"]})

    def _friend_by_tuin(self, req, need):
        error = self._session_for(req, need)[1]
        if error:
            return None, error
        friend = self.world.friends.by("uin", req.params.get("tuin"))
        return (friend, None) if friend is not None else (None, retcode(BAD_REQUEST))

    def _friend_uin(self, req):
        friend, error = self._friend_by_tuin(req, ("vfwebqq",))
        return error or Response.json({"retcode": 0, "result": {"uiuin": "", "account": friend.qq,
                                                                "uin": friend.uin}})

    def _long_nick(self, req):
        friend, error = self._friend_by_tuin(req, ("vfwebqq",))
        return error or Response.json({"retcode": 0, "result": [{"uin": friend.uin, "lnick": friend.lnick}]})

    def _friend_info(self, req):
        friend, error = self._friend_by_tuin(req, ("vfwebqq", "psessionid"))
        return error or Response.json({"retcode": 0, "result": self._profile(
            friend, stat=STAT.get(friend.status, 20), vip_info=friend.vip_level)})

    def _recent_list(self, req):
        error = self._session_for(req, ("vfwebqq",))[1]
        if error:
            return error
        recent = [{"type": kind, "uin": uin} for kind, uin in reversed(self._recent)]
        return Response.json({"retcode": 0, "result": recent})

    def _change_status(self, req):
        session, error = self._session_for(req, ("psessionid",))
        if error:
            return error
        status = req.params.get("newstatus")
        if status not in STATUSES:
            return retcode(BAD_REQUEST)
        session.status = status
        return Response.json({"retcode": 0, "result": "ok"})


###############################################################################
# 8. Routes: poll2 and sending
###############################################################################

SEND_TARGETS = {"send_buddy_msg2": "to", "send_qun_msg2": "group_uin", "send_discu_msg2": "did",
                "send_sess_msg2": "to"}


class ChannelRoutes(object):
    """The d1.web2 channel: poll2, the four sends and get_c2cmsg_sig2."""

    def _poll2(self, req):
        session, error = self._session_for(req, ("psessionid",), late=100012)
        if error:
            return error
        if self.knobs["require_online_buddies"] and not session.registered:
            return retcode(103)
        session.unread = []                 # this poll says the last answer was read
        deadline = time.time() + self.poll_hold
        while not self._events and session.valid and not self._stopping.is_set():
            remaining = deadline - time.time()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        if not session.valid:
            return retcode(self.knobs["auth_retcode"])
        if self._events:
            events = list(self._events)
            self._events.clear()
            if self.knobs["poll_ack"]:
                session.unread = events
            if any(e.get("poll_type") == "kick_message" for e in events):
                session.valid = False
            return Response.json({"result": events, "retcode": 0})
        idle = str(self.knobs["idle"])
        if idle in IDLE_ANSWERS:
            return Response.json(IDLE_ANSWERS[idle])
        return status_page(to_int(idle, 504))

    def _send(self, req):
        endpoint = req.path.rsplit("/", 1)[-1]
        error = self._session_for(req, ("psessionid",), late=100012)[1]
        if error:
            return error
        r = req.r
        if not isinstance(r, dict):
            return retcode(BAD_REQUEST, errmsg="bad r")
        try:
            content = json.loads(r.get("content") or "")
        except (TypeError, ValueError):
            content = None
        if not isinstance(content, list):
            return retcode(BAD_REQUEST, errmsg="bad content")
        font_last = bool(content) and isinstance(content[-1], list) and content[-1][:1] == ["font"]
        if not font_last and not self.knobs["lenient_font"]:
            return retcode(BAD_REQUEST, errmsg="font element must come last")
        record = {"endpoint": endpoint, "r": r, "content": content,
                  "text": "".join(s for s in content if isinstance(s, str)), "msg_id": r.get("msg_id")}
        target = self._send_target(endpoint, r, record)
        if target is None:
            return retcode(BAD_REQUEST, errmsg="unknown target")
        code = self._send_code()
        record.update(target=target.ids()[0], retcode=code, delivered=code in (0, 100100), time=time.time())
        self.sent.append(record)
        if record["delivered"] and endpoint in RECENT_KINDS:
            self._touch(RECENT_KINDS[endpoint], target)
            if endpoint == "send_qun_msg2" and self.knobs["echo_group"]:
                me = self.world.self_member(target)
                self._push(self._message("group_message", target.gid, content, send_uin=me.uin,
                                         group_code=target.gid))
        if self.knobs["send_retcode"] is None and code == 0:
            return Response.json({"errCode": 0, "msg": "send ok"})
        return retcode(code, errmsg="error!!!" if code else "")

    def _send_target(self, endpoint, r, record):
        """The entity a send names (None when unknown or, for sess, when the signature is wrong)."""
        ref = r.get(SEND_TARGETS[endpoint])
        if endpoint == "send_buddy_msg2":
            return self.world.friends.by("uin", ref)
        if endpoint == "send_qun_msg2":
            return self.world.groups.by("gid", ref)
        if endpoint == "send_discu_msg2":
            return self.world.discusses.by("did", ref)
        sig = self._sigs.get(r.get("group_sig"))
        if sig is None or sig[1:] != (to_int(ref), to_int(r.get("service_type"))):
            return None
        source = self.world.discusses.by("did", sig[0]) if sig[2] else self.world.groups.by("gid", sig[0])
        member = source.members.by("uin", ref) if source is not None else None
        if member is not None:
            record.update(via="discuss" if sig[2] else "group", source=sig[0])
        return member

    def _send_code(self):
        """0 or the knob's retcode, or 1202 when the rate limit is exceeded."""
        limit = self.knobs["rate_limit"]
        if limit:
            count, window = limit
            now = time.time()
            while self._send_times and self._send_times[0] < now - window:
                self._send_times.popleft()
            if len(self._send_times) >= count:
                return 1202
            self._send_times.append(now)
        code = self.knobs["send_retcode"]
        return 0 if code is None else code

    def _c2cmsg_sig(self, req):
        error = self._session_for(req, ("psessionid",))[1]
        if error:
            return error
        service_type = to_int(req.params.get("service_type"), 0)
        source = (self.world.discusses.by("did", req.params.get("id")) if service_type == 1
                  else self.world.groups.by("gid", req.params.get("id")))
        member = source.members.by("uin", req.params.get("to_uin")) if source is not None else None
        value = ""
        if member is not None:
            value = secrets.token_hex(40)
            self._sigs[value] = (to_int(req.params.get("id")), member.uin, service_type)
        return Response.json({"retcode": 0, "result": {
            "type": 0, "value": value, "flags": {"text": 1, "pic": 1, "file": 1, "audio": 1, "video": 1}}})


###############################################################################
# 9. Routes: qun.qq.com and qinfo.clt.qq.com group administration
###############################################################################


def _qq_list(text):
    return [to_int(x) for x in str(text or "").split("|") if x.strip()]


class QunRoutes(object):
    """Friend/group/member lists with real numbers, and kick, mute, admin, card, invite, sign-in."""

    def _qun_auth(self, req):
        """True if the skey cookie is the login's and bkn is derived from it."""
        auth, skey = self._auth, req.cookies.get("skey", "")
        return (auth is not None and auth.valid and skey == auth.skey
                and to_int(req.params.get("bkn")) == bkn(skey))

    def _qun_group(self, req):
        return self.world.groups.by("qq", req.params.get("gc"))

    def _qun_friend_list(self, req):
        if not self._qun_auth(req):
            return Response.json({"ec": EC_BKN})
        result = {}
        for c in self.world.categories:
            entry = {"mems": []} if c["index"] == 0 else {"gname": c["name"], "mems": []}
            result[str(c["index"])] = entry
        for f in self.world.friends:
            result[str(f.category)]["mems"].append({"name": f.markname or f.nick, "uin": f.qq})
        return Response.json({"ec": 0, "result": result})

    def _qun_group_list(self, req):
        if not self._qun_auth(req):
            return Response.json({"ec": EC_BKN})
        lists = {"create": [], "manage": [], "join": []}
        for g in self.world.groups:
            me, owner = self.world.self_member(g), g.owner
            kind = {"owner": "create", "admin": "manage"}.get(me.role if me else "", "join")
            lists[kind].append({"gc": g.qq, "gn": g.name, "owner": owner.qq if owner else 0})
        lists["ec"] = 0
        return Response.json(lists)

    def _qun_search_members(self, req):
        if not self._qun_auth(req):
            return Response.json({"ec": EC_BKN})
        group = self._qun_group(req)
        if group is None:
            return Response.json({"ec": EC_MISSING})
        start = max(0, to_int(req.params.get("st"), 0))
        end = to_int(req.params.get("end"), len(group.members))
        now = int(time.time())
        mems = [{"card": m.card, "flag": 0, "g": int(m.gender == "female"), "join_time": m.join_time,
                 "last_speak_time": m.last_speak_time, "lv": {"level": m.level, "point": m.point}, "nick": m.nick,
                 "qage": max(0, (now - m.join_time) // (365 * 86400)), "role": ROLE_CODES[m.role], "tags": "-1",
                 "uin": m.qq} for m in group.members[start:end + 1]]
        return Response.json({"ec": 0, "errcode": 0, "em": "", "adm_max": 10,
                              "adm_num": sum(1 for m in group.members if m.role == "admin"),
                              "count": len(group.members), "max_count": group.max_member,
                              "levelname": {str(i + 1): n for i, n in enumerate(LEVEL_NAMES)}, "mems": mems,
                              "search_count": len(group.members), "svr_time": now, "vecsize": 1})

    def _qinfo_members(self, req):
        if not self._qun_auth(req):
            return Response.json({"ec": EC_BKN})
        group = self._qun_group(req)
        if group is None:
            return Response.json({"ec": EC_MISSING})
        members, owner = group.members, group.owner
        friends = {f.qq for f in self.world.friends}
        return Response.json({
            "ec": 0, "errcode": 0, "em": "", "owner": owner.qq if owner else 0,
            "adm": [m.qq for m in members if m.role == "admin"],
            "mems": [{"u": m.qq, "n": m.nick, "g": int(m.gender == "female"), "b": 0} for m in members],
            "cards": {str(m.qq): m.card for m in members if m.card},
            "times": {str(m.qq): m.last_speak_time for m in members},
            "join": {str(m.qq): m.join_time for m in members},
            "levelname": {"lvln%d" % (i + 1): n for i, n in enumerate(LEVEL_NAMES)},
            "lv": {str(m.qq): {"l": m.level, "p": m.point} for m in members},
            "remarks": {}, "friends": [m.qq for m in members if m.qq in friends],
            "max_admin": 10, "max_num": group.max_member, "search_count": len(members)})

    def _admin(self, req, action, change):
        """Check bkn, find the group, let change(group, me, record) do the work, record the action."""
        if not self._qun_auth(req):
            return Response.json({"ec": EC_BKN})
        record = {"action": action, "form": dict(req.form), "group": to_int(req.params.get("gc")),
                  "members": [], "seconds": None, "time": time.time()}
        group = self._qun_group(req)
        me = self.world.self_member(group) if group is not None else None
        ec = EC_MISSING if me is None else change(group, me, record)
        record["ec"] = ec
        self.admin_actions.append(record)
        answer = {"ec": ec, "errcode": ec, "em": ""}
        if action == "sign" and ec == 0:
            answer.update(is_sign=1, conti_count=1, rank=1)
        return Response.json(answer)

    def _qun_kick(self, req):
        def change(group, me, record):
            members = _targets(group, _qq_list(req.params.get("ul")), record)
            if members is None:
                return EC_MISSING
            if not all(_outranks(me, m) for m in members):
                return EC_DENIED
            for m in members:
                self.world.remove_member(group, m)
            return 0
        return self._admin(req, "delete_group_member", change)

    def _qun_shutup(self, req):
        def change(group, me, record):
            try:
                pairs = [(to_int(e["uin"]), to_int(e["t"])) for e in json.loads(req.params.get("shutup_list"))]
            except (TypeError, ValueError, KeyError):
                return EC_BAD
            if not pairs or any(qq is None or t is None or t < 0 for qq, t in pairs):
                return EC_BAD
            record["seconds"] = pairs[0][1]
            members = _targets(group, [qq for qq, _ in pairs], record)
            if members is None:
                return EC_MISSING
            if me.role == "member" or any(m.role != "member" for m in members):
                return EC_DENIED
            now = int(time.time())
            for m, (_, t) in zip(members, pairs):
                self.world.update_member(group, m, shutup_until=now + t if t else 0)
            return 0
        return self._admin(req, "set_group_shutup", change)

    def _qun_set_admin(self, req):
        def change(group, me, record):
            members = _targets(group, _qq_list(req.params.get("u")), record)
            if members is None:
                return EC_MISSING
            if me.role != "owner" or members[0].role == "owner":
                return EC_DENIED
            self.world.update_member(group, members[0], role="admin" if to_int(req.params.get("op")) == 1
                                     else "member")
            return 0
        return self._admin(req, "set_group_admin", change)

    def _qun_card(self, req):
        def change(group, me, record):
            members = _targets(group, _qq_list(req.params.get("u")), record)
            if members is None:
                return EC_MISSING
            if members[0] is not me and not _outranks(me, members[0]):
                return EC_DENIED
            self.world.update_member(group, members[0], card=req.params.get("name") or "")
            return 0
        return self._admin(req, "set_group_card", change)

    def _qun_invite(self, req):
        def change(group, me, record):
            qqs = _qq_list(req.params.get("ul"))
            record["members"] = qqs
            friends = [self.world.friends.by("qq", qq) for qq in qqs]
            if not qqs or None in friends:
                return EC_MISSING
            if me.role == "member" or any(group.members.get(f.uin) is not None for f in friends):
                return EC_DENIED
            for f in friends:
                self.world.add_member(group, uin=f.uin, join_time=int(time.time()))
            return 0
        return self._admin(req, "add_group_member", change)

    def _qun_sign(self, req):
        return self._admin(req, "sign", lambda group, me, record: 0)


def _targets(group, qqs, record):
    """The members of group with these QQ numbers (recorded), or None if one is missing."""
    record["members"] = qqs
    members = [group.members.by("qq", qq) for qq in qqs]
    return members if qqs and None not in members else None


def _outranks(me, other):
    """Whether me may kick other (or change other's card): owners any non-owner, admins members."""
    return other is not me and ROLE_CODES[me.role] < ROLE_CODES[other.role]


###############################################################################
# 10. Simulator: routing, control API, HTTP control
###############################################################################

ROUTES = {
    "/": "_page", "/proxy.html": "_page", "/cgi-bin/xlogin": "_xlogin", "/cgi-bin/login": "_xlogin",
    "/ptqrshow": "_ptqrshow", "/ptqrlogin": "_ptqrlogin", "/check_sig": "_check_sig",
    "/pt4_auth": "_pt4_auth", "/logout": "_logout",
    "/api/getvfwebqq": "_getvfwebqq", "/channel/login2": "_login2",
    "/api/get_self_info2": "_self_info", "/api/get_user_friends2": "_user_friends",
    "/channel/get_online_buddies2": "_online_buddies", "/api/get_group_name_list_mask2": "_group_list",
    "/api/get_group_info_ext2": "_group_info", "/api/get_discus_list": "_discus_list",
    "/channel/get_discu_info": "_discu_info", "/api/get_friend_uin2": "_friend_uin",
    "/api/get_single_long_nick2": "_long_nick", "/api/get_friend_info2": "_friend_info",
    "/channel/get_recent_list2": "_recent_list", "/channel/change_status2": "_change_status",
    "/channel/poll2": "_poll2", "/channel/send_buddy_msg2": "_send", "/channel/send_qun_msg2": "_send",
    "/channel/send_discu_msg2": "_send", "/channel/send_sess_msg2": "_send",
    "/channel/get_c2cmsg_sig2": "_c2cmsg_sig",
    "/cgi-bin/qun_mgr/get_friend_list": "_qun_friend_list", "/cgi-bin/qun_mgr/get_group_list": "_qun_group_list",
    "/cgi-bin/qun_mgr/search_group_members": "_qun_search_members",
    "/cgi-bin/qun_info/get_group_members": "_qinfo_members",
    "/cgi-bin/qun_info/get_group_members_new": "_qinfo_members",
    "/cgi-bin/qun_mgr/delete_group_member": "_qun_kick", "/cgi-bin/qun_info/delete_group_member": "_qun_kick",
    "/cgi-bin/qun_info/set_group_shutup": "_qun_shutup", "/cgi-bin/qun_info/set_group_admin": "_qun_set_admin",
    "/cgi-bin/qun_info/set_group_card": "_qun_card", "/cgi-bin/qun_mgr/add_group_member": "_qun_invite",
    "/cgi-bin/sign": "_qun_sign",
}
REFERER_PATHS = ("/api/", "/channel/", "/cgi-bin/qun_", "/cgi-bin/sign")
WORLD_METHODS = ("add_friend", "remove_friend", "update_friend", "add_group", "remove_group", "update_group",
                 "add_member", "remove_member", "update_member", "add_discuss", "remove_discuss",
                 "update_discuss", "add_discuss_member", "remove_discuss_member")
CONTROL_METHODS = ("scan", "confirm", "reject", "expire", "inject_friend_message", "inject_group_message",
                   "inject_discuss_message", "inject_sess_message", "inject_group_file", "inject_status",
                   "inject_poll", "kick", "fault", "configure", "expire_session", "clear") + WORLD_METHODS


class Simulator(LoginRoutes, ContactRoutes, ChannelRoutes, QunRoutes):
    """A SmartQQ server on one port, driven from tests in Python or over HTTP under /sim/."""

    def __init__(self, world=None, host="127.0.0.1", port=0, poll_hold=55.0, qr_ttl=120.0, auto_scan=None,
                 **knobs):
        self.knobs = dict(KNOBS)
        self.configure(**knobs)
        if world is None:
            world = World.demo()
        elif isinstance(world, dict):
            world = World.from_json(world)
        self.world = world
        self.host, self.port, self.url = host, port, None
        self.poll_hold, self.qr_ttl, self.auto_scan = poll_hold, qr_ttl, auto_scan
        self.sent, self.admin_actions, self.sessions = [], [], []
        self._requests = collections.deque(maxlen=self.knobs["max_requests"])
        self.logins = self.relinks = self.logouts = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._qr = self._auth = None
        self._supertokens = {}          # supertoken -> qq, for pt4_auth
        self._events = collections.deque(maxlen=10000)
        self._faults = {}
        self._sigs = {}                 # group_sig -> (gid or did, member uin, service_type)
        self._recent = collections.OrderedDict()
        self._send_times = collections.deque()
        self._cache, self._cache_version = {}, None
        self._msg_ids = itertools.count(10000 + secrets.randbelow(40000))
        self._server = None
        self._threads = []

    # -- lifecycle --

    def start(self):
        """Listen and serve on a thread named smartqq-sim-<port>; returns self."""
        self._server = Server((self.host, self.port), self).start()
        self.port = self._server.port
        self.url = "http://%s:%d" % (self.host, self.port)
        log.debug("smartqq_sim: serving on %s", self.url)
        return self

    def stop(self):
        """Answer held polls, close the socket and connections, and join every thread."""
        if self._server is None:
            return
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._server.close()
        for thread in self._threads:
            thread.join(5.0)
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _spawn(self, name, target, *args):
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            self._threads.append(thread)
        thread.start()

    def configure(self, **knobs):
        """Change knobs (see the module docstring)."""
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise TypeError("unknown knob(s): %s" % ", ".join(sorted(unknown)))
        self.knobs.update(knobs)

    # -- requests --

    def respond(self, req):
        """The Response (or DROP) for one request."""
        if req.path.startswith("/sim/"):
            return self._control(req)
        self._requests.append(req.record())
        fault = self._take_fault(req.path)
        if fault is not None:
            answer = self._fault_answer(fault)
            if answer is not None:
                return answer
        route = ROUTES.get(req.path)
        if route is None:
            return Response("<html><body>404 Not Found</body></html>", 404)
        if self.knobs["require_referer"] and req.path.startswith(REFERER_PATHS) and not req.referer:
            return Response.json({"retcode": BAD_REQUEST, "errmsg": "Referer required"}, 403)
        with self._lock:        # routes see the world whole; poll2's wait releases the lock
            return getattr(self, route)(req)

    def fault(self, path, count=1, retcode=None, status=None, delay=None, drop=False, body=None, extra=None):
        """The next count requests to path (a route path or its last part, "poll2") get: a JSON
        {"retcode","errmsg"} plus extra, or HTTP status, or the raw body; delay sleeps first (alone it
        only slows the normal answer); drop closes the connection without an answer. Retcode 116
        carries a new ptwebqq in "p" (invented if extra has none) that the simulator adopts."""
        if not path.startswith("/"):
            matches = [p for p in ROUTES if p.rsplit("/", 1)[-1] == path]
            if len(matches) != 1:
                raise ValueError("no single route named %r" % path)
            path = matches[0]
        if path not in ROUTES:
            raise ValueError("no route %r" % path)
        with self._lock:
            self._faults.setdefault(path, collections.deque()).append(
                Fault(count, retcode, status, delay, drop, body, extra))

    def _take_fault(self, path):
        with self._lock:
            queue = self._faults.get(path)
            if not queue:
                return None
            fault = queue[0]
            fault.count -= 1
            if fault.count <= 0:
                queue.popleft()
            return fault

    def _fault_answer(self, fault):
        if fault.delay:
            self._stopping.wait(fault.delay)
        if fault.drop:
            return DROP
        if fault.body is not None:
            return Response(fault.body, fault.status or 200, "text/plain; charset=utf-8")
        if fault.retcode is not None:
            extra = dict(fault.extra)
            if fault.retcode == 116:
                extra.setdefault("p", secrets.token_hex(32))
                with self._lock:
                    for holder in (self._auth, self.session):
                        if holder is not None:
                            holder.ptwebqq = extra["p"]
            answer = retcode(fault.retcode, **extra)
            answer.status = fault.status or 200
            return answer
        if fault.status is not None:
            return status_page(fault.status)
        return None

    # -- QR --

    @property
    def qr_state(self):
        with self._lock:
            return self._qr_state()

    def _qr_state(self):
        qr = self._qr
        if qr is None:
            return "none"
        if qr.state in ("waiting", "scanned") and time.time() >= qr.expires:
            qr.state = "expired"
            self._cond.notify_all()
        return qr.state

    def wait_qr(self, state, timeout=5.0):
        """Wait until the latest QR is in state; True if it is."""
        if state not in QR_STATES:
            raise ValueError("no QR state %r" % state)
        deadline = time.time() + timeout
        with self._cond:
            while self._qr_state() != state:
                remaining = deadline - time.time()
                if remaining <= 0:
                    return False
                if self._qr is not None and self._qr.state in ("waiting", "scanned"):
                    remaining = min(remaining, max(0.01, self._qr.expires - time.time()))
                self._cond.wait(remaining)
            return True

    def _move_qr(self, allowed, state):
        with self._cond:
            current = self._qr_state()
            if current not in allowed:
                raise RuntimeError("the QR is %s; it cannot become %s" % (current, state))
            self._set_qr_state(state)

    def _set_qr_state(self, state):
        qr = self._qr
        qr.state = state
        if state == "confirmed":
            qr.auth = Auth(self.world.user.qq)
            self._grant(qr.auth)
        self._cond.notify_all()

    def _grant(self, auth):
        """Make auth the login: the previous one's skey and ptsigx stop working."""
        if self._auth is not None:
            self._auth.valid = False
        self._auth = auth
        self._supertokens[auth.supertoken] = auth.qq

    def scan(self):
        """The waiting QR was scanned (ptqrlogin answers 67)."""
        self._move_qr(("waiting",), "scanned")

    def confirm(self):
        """The scan was confirmed on the phone (ptqrlogin answers 0 with the check_sig URL)."""
        self._move_qr(("waiting", "scanned"), "confirmed")

    def reject(self):
        """The login was refused on the phone (ptqrlogin answers 68)."""
        self._move_qr(("waiting", "scanned"), "rejected")

    def expire(self):
        """The QR expires now (ptqrlogin answers 65)."""
        self._move_qr(("waiting", "scanned"), "expired")

    # -- sessions and records --

    @property
    def requests(self):
        """The latest requests (at most max_requests), oldest first, as a new list."""
        return list(self._requests)

    @property
    def session(self):
        return self.sessions[-1] if self.sessions else None

    def expire_session(self):
        """The current session dies: its calls answer auth_retcode (103), a held poll too."""
        with self._cond:
            if self.session is not None:
                self.session.valid = False
            self._cond.notify_all()

    def clear(self):
        """Forget recorded sends, admin actions and requests, queued faults and undelivered events."""
        with self._lock:
            del self.sent[:], self.admin_actions[:]
            self._requests.clear()
            self._faults.clear()
            self._events.clear()

    # -- poll events --

    def _push(self, event):
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _touch(self, kind, entity):
        """Remember a conversation for get_recent_list2 (type 0 friend, 1 group, 2 discussion)."""
        key = (kind, entity.ids()[0])
        self._recent.pop(key, None)
        self._recent[key] = True

    def _message(self, poll_type, from_uin, content, **value):
        msg_id = next(self._msg_ids)
        value.update(from_uin=from_uin, to_uin=self.world.user.qq, msg_id=msg_id, msg_type=MSG_TYPES[poll_type],
                     time=int(time.time()), content=_recv_content(content))
        return {"poll_type": poll_type, "value": value}

    def inject_friend_message(self, sender, content):
        """A friend (uin or qq) writes to the self account; returns the msg_id."""
        with self._lock:
            friend = self.world.friend(sender)
            event = self._message("message", friend.uin, content)
            self._touch(0, friend)
        self._push(event)
        return event["value"]["msg_id"]

    def inject_group_message(self, group, sender, content):
        """A member (uin or qq) writes in a group (gid, code or number); returns the msg_id."""
        with self._lock:
            group = self.world.group(group)
            member = self.world.member(group, sender)
            event = self._message("group_message", group.gid, content, send_uin=member.uin, group_code=group.gid)
            self._touch(1, group)
        self._push(event)
        return event["value"]["msg_id"]

    def inject_discuss_message(self, discuss, sender, content):
        """A member writes in a discussion; returns the msg_id."""
        with self._lock:
            discuss = self.world.discuss(discuss)
            member = self.world.discuss_member(discuss, sender)
            event = self._message("discu_message", discuss.did, content, send_uin=member.uin, did=discuss.did)
            self._touch(2, discuss)
        self._push(event)
        return event["value"]["msg_id"]

    def inject_sess_message(self, via, source, sender, content):
        """A member of a group (via "group") or discussion (via "discuss") writes privately."""
        with self._lock:
            if via == "group":
                source = self.world.group(source)
                member, ident = self.world.member(source, sender), source.gid
            elif via == "discuss":
                source = self.world.discuss(source)
                member, ident = self.world.discuss_member(source, sender), source.did
            else:
                raise ValueError("via must be 'group' or 'discuss', not %r" % (via,))
            event = self._message("sess_message", member.uin, content, id=ident, ruin=member.qq,
                                  service_type=int(via == "discuss"),
                                  flags={"text": 1, "pic": 1, "file": 1, "audio": 1, "video": 1})
        self._push(event)
        return event["value"]["msg_id"]

    def inject_group_file(self, group, sender, filename):
        """A member shares a file in a group: a group_web_message notice; returns the msg_id."""
        with self._lock:
            group = self.world.group(group)
            member = self.world.member(group, sender)
            msg_id = next(self._msg_ids)
            xml = ('<?xml version="1.0" encoding="utf-8"?><d><n t="h" u="%d"/><n t="t" s="共享文件"/><n t="b"/>'
                   '<n t="t" s="%s"/></d>' % (member.qq, html.escape(filename)))
        self._push({"poll_type": "group_web_message", "value": {
            "msg_id": msg_id, "from_uin": group.gid, "to_uin": self.world.user.qq, "msg_type": 45,
            "send_uin": member.uin, "group_code": group.gid, "group_type": 1, "ver": 1, "xml": xml}})
        return msg_id

    def inject_status(self, friend, status="online", client_type=1):
        """A friend's presence changes: the world and a buddies_status_change event."""
        if status not in STATUSES:
            raise ValueError("no status %r" % (status,))
        with self._lock:
            friend = self.world.update_friend(friend, status=status, client_type=client_type)
        self._push({"poll_type": "buddies_status_change",
                    "value": {"uin": friend.uin, "status": status, "client_type": client_type}})

    def inject_poll(self, event):
        """Queue any raw poll2 result element ({"poll_type": ..., "value": {...}})."""
        if not isinstance(event, dict) or "poll_type" not in event:
            raise ValueError("a poll event is a dict with a poll_type")
        self._push(event)

    def kick(self, reason="您的帐号在另一地点登录，您已被迫下线。"):
        """Queue a kick_message; the session dies when a poll delivers it."""
        self._push({"poll_type": "kick_message", "value": {
            "from_uin": 10000, "to_uin": self.world.user.qq, "msg_id": next(self._msg_ids), "msg_type": 48,
            "reason": reason, "show_reason": 1, "time": int(time.time())}})

    # -- HTTP control API --

    def state(self):
        """Counters and the QR and session state, as GET /sim/state answers."""
        with self._lock:
            session = self.session
            return {"url": self.url, "qr_state": self._qr_state(), "session": session and session.to_json(),
                    "logins": self.logins, "relinks": self.relinks, "logouts": self.logouts,
                    "sent": len(self.sent), "admin_actions": len(self.admin_actions),
                    "requests": len(self._requests),
                    "pending_events": len(self._events), "knobs": self.knobs}

    def _control(self, req):
        name = req.path[len("/sim/"):]
        views = {"state": self.state, "sent": lambda: self.sent, "admin_actions": lambda: self.admin_actions,
                 "requests": lambda: self.requests, "world": self.world.to_json}
        if req.method == "GET" and name in views:
            with self._lock:
                return Response.json(views[name]())
        if req.method != "POST" or name not in CONTROL_METHODS:
            return Response.json({"ok": False, "error": "no control %s /sim/%s" % (req.method, name)}, 404)
        try:
            kwargs = json.loads(req.body.decode("utf-8") or "{}")
            if not isinstance(kwargs, dict):
                raise ValueError("the body must be a JSON object of keyword arguments")
            result = getattr(self, name)(**kwargs)
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            return Response.json({"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}, 400)
        return Response.json({"ok": True, "result": result.to_json() if isinstance(result, Entity) else result})


def _world_method(name):
    """A Simulator method running World.<name> under the simulator's lock."""
    def method(self, *args, **fields):
        with self._lock:
            return getattr(self.world, name)(*args, **fields)
    method.__name__ = name
    method.__doc__ = getattr(World, name).__doc__ or "World.%s under the simulator's lock." % name
    return method


for _name in WORLD_METHODS:
    setattr(Simulator, _name, _world_method(_name))


def _recv_content(content):
    """Received content: the font element first, then strings and ["face", id] (names become ids)."""
    segments = [content] if isinstance(content, str) else list(content)
    out = [FONT]
    for seg in segments:
        if isinstance(seg, (list, tuple)) and seg[:1] == ["font"]:
            out[0] = list(seg)
        elif isinstance(seg, (list, tuple)) and len(seg) == 2 and seg[0] == "face" and isinstance(seg[1], str):
            out.append(["face", FACE_IDS.get(seg[1], to_int(seg[1], 0))])
        else:
            out.append(list(seg) if isinstance(seg, tuple) else seg)
    return out


###############################################################################
# 11. CLI
###############################################################################


def build_parser():
    parser = argparse.ArgumentParser(description="A protocol-faithful SmartQQ (w.qq.com) simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--world", metavar="FILE", help="a world JSON file (schema: the module docstring)")
    for name, what in (("friends", "number of friends"), ("groups", "number of groups"),
                       ("members", "members per group"), ("discusses", "number of discussions"),
                       ("seed", "random seed")):
        parser.add_argument("--" + name, type=int, help="generate a world: %s" % what)
    parser.add_argument("--poll-hold", type=float, default=55.0, help="seconds an idle poll2 is held")
    parser.add_argument("--qr-ttl", type=float, default=120.0, help="seconds before a QR expires")
    parser.add_argument("--auto-scan", type=float, metavar="SECONDS", help="scan and confirm each QR by itself")
    parser.add_argument("--idle", choices=("json", "error", "504", "502", "100012"), help="idle poll2 answer")
    parser.add_argument("--echo-group", action="store_true", help="echo own group messages through poll2")
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE", help="set any knob")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every request")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    knobs = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            knobs[name] = json.loads(value)
        except ValueError:
            knobs[name] = value
    if args.idle:
        knobs["idle"] = args.idle
    if args.echo_group:
        knobs["echo_group"] = True
    spec = {k: getattr(args, k) for k in ("friends", "groups", "members", "discusses", "seed")
            if getattr(args, k) is not None}
    world = World.load(args.world) if args.world else World.generate(**spec) if spec else None
    try:
        sim = Simulator(world, host=args.host, port=args.port, poll_hold=args.poll_hold, qr_ttl=args.qr_ttl,
                        auto_scan=args.auto_scan, **knobs)
    except TypeError as exc:
        parser.error(str(exc))
    sim.start()
    w = sim.world
    log.info("SmartQQ simulator on %s: self QQ %d (%s), %d friends, %d groups, %d discussions; control API at %s/sim/",
             sim.url, w.user.qq, w.user.nick, len(w.friends), len(w.groups), len(w.discusses), sim.url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
