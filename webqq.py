#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""webqq: a drop-in Python QQ client that serves the Openqq HTTP API of Mojo-Webqq.

One module, read top to bottom:

 1. Constants       protocol constants, client states, event names
 2. Helpers         hash33 / bkn / time33 / friend-list hash, atomic files, faces
 3. Transport       Http: requests (or urllib), cookies as JSON, upstream override
 4. Model           User, Friend, Group, GroupMember, Discuss, DiscussMember, Contacts
 5. Messages        Message and its Openqq JSON, content flattening and encoding
 6. Events          EventEmitter
 7. Upstreams       the Upstream interface and SmartQQ, the w.qq.com web protocol
 8. Client          Client(**options): states, files, send queue, relogin, plugins
 9. HTTP API        what every HTTP face builds on: servers, requests, answers, the guard, parked
                    long-polls, poll_api (the Openqq API, the console, the controller, OneBot's receiver)
10. QR display      PNG decoding with zlib/struct, terminal drawing, file, OS viewer, display modes
11. Config and CLI  main(argv): INI file < WEBQQ_* variables < flags, --init-config, console
                    window, progress, restarts, demo mode

A user script:

    from webqq import Client
    client = Client(account="default", tmpdir="/var/lib/webqq")
    client.load("showmsg")
    client.load("openqq", listen=[{"host": "127.0.0.1", "port": 5000}])
    client.run()
"""

import argparse
import codecs
import collections
import datetime
import difflib
import email.parser
import email.policy
import errno
import hmac
import html
import http.client
import http.cookiejar
import importlib
import importlib.util
import ipaddress
import json
import logging
import os
import queue
import random
import re
import selectors
import shutil
import socket
import socketserver
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
import zlib
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if __name__ == "__main__":
    # `python webqq.py`: the plugins' `from webqq import ...` must get this very module, not a second copy
    sys.modules.setdefault("webqq", sys.modules[__name__])

try:
    import requests
except ImportError:  # a locked-down machine: the core still runs on urllib
    requests = None

__version__ = "1.0.0"
# The plugin API: what plugins and upstreams may use (docs/internals.md describes each name).
__all__ = [
    # the client and its upstreams
    "Client", "EventEmitter", "Upstream", "SmartQQ", "UpstreamError", "LoginFailed", "NeedRelogin", "Stopped",
    "TransportError", "Http", "Reply", "final_status", "OWN_AGENT",
    # contacts and messages
    "Contacts", "User", "Friend", "Group", "GroupMember", "Discuss", "DiscussMember", "Message", "FACES",
    "FACE_IDS", "encode_content", "flatten_content",
    # HTTP faces
    "Api", "ApiServer", "TrackedHTTPServer", "Request", "Response", "Stream", "ApiError", "bad_request", "Guard",
    "check_protected", "listen_entries", "parse_listen", "serve", "points_into", "Poller", "AUTH_FAILED",
    "NOT_RUNNING", "NOT_FOUND", "BAD_REQUEST", "INTERNAL_ERROR",
    # options: one table per plugin, read by one helper (docs/internals.md, "Plugins")
    "OptionError", "read_options", "one_of", "non_negative", "whole", "check_url", "check_listen", "check_port",
    "check_log_level",
    "ArgumentParser",
    # helpers
    "Thread", "json_dumps", "to_int", "to_bool", "to_list", "is_loopback", "redact_url", "atomic_write",
    "remove_file", "read_pid", "pid_alive", "save_file", "configure_logging", "read_config", "ENV_PREFIX", "main",
]

###############################################################################
# 1. Constants
###############################################################################

CLIENTID = 53999199
APPID = 501004106
DAID = 164
JS_VER = 10233
USER_AGENT = ("Mozilla/5.0 (Windows NT 6.1) AppleWebKit/537.36 "
              "(KHTML, like Gecko) Chrome/37.0.2062")

S_REF = "https://s.web2.qq.com/proxy.html?v=20130916001&callback=1&id=1"
D_REF = "http://d1.web2.qq.com/proxy.html?v=20151105001&callback=1&id=2"
XLOGIN = ("https://xui.ptlogin2.qq.com/cgi-bin/xlogin?daid=164&target=self&style=40"
          "&pt_disable_pwd=1&mibao_css=m_webqq&appid=501004106&enable_qlogin=0"
          "&no_verifyimg=1&s_url=http%3A%2F%2Fw.qq.com%2Fproxy.html&f_url=loginerroralert"
          "&strong_login=1&login_state=10&t=20131024001")
QUN_REF = "http://qun.qq.com/member.html"
QINFO_REF = "http://qinfo.clt.qq.com/member.html"
QINFO3_REF = "http://qinfo.clt.qq.com/qinfo_v3/member.html"

# Client states, in the order a login walks through them (the original spells "scaning").
STATES = ("init", "loading", "scaning", "confirming", "updating", "running", "stop")

# Numeric presence and client codes of the protocol (Mojo code2state / code2client).
STATE_CODES = {10: "online", 20: "offline", 30: "away", 40: "hidden",
               50: "busy", 60: "callme", 70: "silent"}
CLIENT_TYPES = {1: "pc", 21: "mobile", 24: "iphone", 41: "web"}
# sys.platform as the original's $^O, for get_client_info and the state file.
PERL_OS = {"linux": "linux", "win32": "MSWin32", "cygwin": "cygwin", "darwin": "darwin"}
# Presence modes a client may log in with (the mode option).
MODES = ("online", "away", "busy", "silent", "hidden", "offline", "callme")
# Where the QR code can go (the qrcode_display option): built in, by a plugin, or nowhere but the file.
QR_MODES = ("terminal", "file", "viewer", "console", "email", "none")

# Send status texts (Mojo Message/Base.pm): code -> msg; the info text varies.
SEND_OK, SEND_FAILED = "发送成功", "发送失败"

# poll2 retcodes: ignored (no message), relogin (the session may be gone), relink; sends: not an error.
POLL_IGNORED = frozenset((102, 109, 110, 1202, 100012, 100003, 100100))
POLL_RELOGIN = frozenset((100, 103, 100000, 100001))
POLL_RELINK = frozenset((120, 121))
SEND_IGNORED = frozenset((1202, 100100))

###############################################################################
# 2. Helpers
###############################################################################


def hash33(s, seed=0):
    """ptqrtoken from qrsig (seed 0) and bkn from skey (seed 5381): 31-bit hash."""
    e = seed
    for ch in s:
        e += (e << 5) + ord(ch)
    return e & 0x7FFFFFFF


def bkn(skey):
    """The CSRF token qun.qq.com and qinfo.clt.qq.com expect, derived from the skey cookie."""
    return hash33(skey or "", 5381)


def time33(s):
    """pt4_auth's auth_token and logout's pt4_hkey: a 32-bit unsigned hash."""
    e = 0
    for ch in s:
        e = (33 * e + ord(ch)) % 4294967296
    return e


def friend_hash(uin, ptwebqq):
    """The `hash` field of get_user_friends2 and get_group_name_list_mask2."""
    uin = int(uin)
    n = [0, 0, 0, 0]
    for i, ch in enumerate(ptwebqq or ""):
        n[i % 4] ^= ord(ch)
    v = [((uin >> 24) & 0xFF) ^ ord("E"), ((uin >> 16) & 0xFF) ^ ord("C"),
         ((uin >> 8) & 0xFF) ^ ord("O"), (uin & 0xFF) ^ ord("K")]
    out = [n[0], v[0], n[1], v[1], n[2], v[2], n[3], v[3]]
    return "".join("%02X" % (b & 0xFF) for b in out)


def quoted_args(text):
    """The single-quoted arguments of a ptuiCB(...) / ptui_auth_CB(...) answer."""
    return re.findall(r"'(.*?)'", text or "")


def atomic_write(path, data, mode=0o600):
    """Write bytes or text to path through a temporary file and rename, created with mode."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        try:
            os.fchmod(fd, mode)
        except (AttributeError, OSError):  # Windows has no fchmod
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_file(path, data, log, what, level=logging.ERROR):
    """atomic_write(path, data); a failure is logged (what: the file, for a person) and the caller goes on."""
    try:
        atomic_write(path, data)
    except OSError as e:
        log.log(level, "%s写入失败 (cannot write the %s file) %s: %s", *(what + (path, e)))


def remove_file(path):
    """Delete path if it exists; True when something was removed."""
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


class Thread(threading.Thread):
    """A daemon thread that never dies silently: an exception that ends it is logged with the
    thread's name, then on_crash(name) runs (a client's threads stop the client)."""

    DIED = "线程%s意外终止 (thread %s died)"

    def __init__(self, name, target, args=(), log=None, on_crash=None):
        threading.Thread.__init__(self, target=target, args=args, name=name, daemon=True)
        self.log = log or logging.getLogger("webqq")
        self.on_crash = on_crash

    def run(self):
        try:
            threading.Thread.run(self)
        except Exception:
            self.log.exception(self.DIED, self.name, self.name)
            if self.on_crash is not None:
                self.on_crash(self.name)


def json_dumps(obj):
    """Compact UTF-8 JSON text with sorted keys, non-ASCII kept, as the original writes it."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def to_int(value, default=None):
    """int(value) for numbers and numeric strings, else default."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


def to_bool(value):
    """An option's truth: booleans, numbers, and the usual words of an INI file."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off", "none")
    return bool(value)


def to_list(value):
    """A list option given as a list, a tuple, or a comma/space separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item for item in re.split(r"[\s,]+", value) if item]
    return list(value)


def yes_no(text):
    """True or False for the words of an INI boolean (1 true yes on / 0 false no off); None for others."""
    text = str(text).strip().lower()
    return True if text in ("1", "true", "yes", "on") else False if text in ("0", "false", "no", "off") else None


def cut_utf8(text, limit):
    """text cut to at most limit UTF-8 bytes on a character boundary."""
    if text is None or limit is None or limit <= 0:
        return text
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "msg": 25, "warn": logging.WARNING,
              "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL}
logging.addLevelName(25, "MSG")


class LogFormatter(logging.Formatter):
    """The original's log lines: [yy/mm/dd HH:MM:SS] [level] text; with a label (a controller's
    client names itself so), [yy/mm/dd HH:MM:SS] [level] [label] text."""

    NAMES = {logging.DEBUG: "debug", logging.INFO: "info", 25: "msg", logging.WARNING: "warn",
             logging.ERROR: "error", logging.CRITICAL: "fatal"}

    def __init__(self, label=None):
        tag = "[%s] " % label.replace("%", "%%") if label else ""
        logging.Formatter.__init__(self, "[%(asctime)s] [%(short)s] " + tag + "%(message)s", "%y/%m/%d %H:%M:%S")

    def format(self, record):
        record.short = self.NAMES.get(record.levelno, record.levelname.lower())
        return logging.Formatter.format(self, record)


class StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever sys.stderr is at the time (it may be replaced later)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(level="info", path=None, stream=None, label=None):
    """Send the `webqq` logger to path (or stream, default stderr) at level, each line with label if
    given; idempotent."""
    logger = logging.getLogger("webqq")
    logger.setLevel(LOG_LEVELS.get(str(level).lower(), logging.INFO))
    for handler in [h for h in logger.handlers if getattr(h, "webqq", False)]:
        logger.removeHandler(handler)
        handler.close()
    if path:
        handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream) if stream else StderrHandler()
    handler.webqq = True
    handler.setFormatter(LogFormatter(label))
    logger.addHandler(handler)
    return logger


def parse_clock(text):
    """(hour, minute) of "HH:MM"; ValueError otherwise."""
    match = re.match(r"^\s*(\d{1,2}):(\d{2})\s*$", str(text))
    if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
        raise ValueError("relogin_at must be a time of day HH:MM, not %r" % text)
    return int(match.group(1)), int(match.group(2))


def next_clock_time(now, hour, minute):
    """The first datetime after now at hour:minute."""
    due = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return due if due > now else due + datetime.timedelta(days=1)


def read_pid(path):
    """The process id written in the file at path; 0 when there is none."""
    try:
        with open(path) as f:
            return to_int(f.read(), 0)
    except OSError:
        return 0


def pid_alive(pid):
    """True when a process with this pid runs (without signalling it, Windows included)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes
        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, never reaped: orphans in containers whose pid 1 does not reap) is gone
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[:1] != ["Z"]
    except OSError:
        return True


# -- options: the client, each plugin and the controller declare theirs in one table ----------------
#
# OPTIONS = OrderedDict([(name, (default, help) or (default, help, check)), ...]): help None for an
# option no file can set (a Python function); check(value) returns the value to use or raises
# ValueError("must be ...").


class OptionError(ValueError, TypeError):
    """An option its owner doesn't have, or a value its check refuses (a TypeError too, like an unknown keyword)."""


def closest(word, choices):
    """The choice closest to word (a misspelling of it), or None."""
    close = difflib.get_close_matches(str(word).lower(), [str(choice) for choice in choices], 1)
    return close[0] if close else None


def did_you_mean(word, choices):
    """" (did you mean 'x'?)" for the choice closest to word, else ""."""
    close = closest(word, choices)
    return " (did you mean %r?)" % close if close else ""


def or_list(words):
    """'a, b or c'."""
    words = [str(word) for word in words]
    return words[0] if len(words) == 1 else "%s or %s" % (", ".join(words[:-1]), words[-1])


def check_option(name, entry, value):
    """value for the option name through its table entry's check (None is unset, and so is "" where the
    default is not a number: not checked)."""
    if len(entry) < 3 or value is None or (value == "" and not isinstance(entry[0], (int, float))):
        return value
    try:
        return entry[2](value)
    except ValueError as e:
        raise OptionError("%s %s" % (name, e))


def read_options(owner, table, options):
    """Every option of table: the value options gives (checked), else the default. OptionError naming
    owner for a name the table lacks (with the closest one) or a value its check refuses."""
    for name in options:
        if name not in table:
            raise OptionError("%s: unknown option %r%s" % (owner, name, did_you_mean(name, table)))
    values = collections.OrderedDict()
    for name, entry in table.items():
        try:
            values[name] = check_option(name, entry, options[name]) if name in options else entry[0]
        except OptionError as e:
            raise OptionError("%s: %s" % (owner, e))
    return values


def option_defaults(table):
    """{name: default} of an options table."""
    return collections.OrderedDict((name, entry[0]) for name, entry in table.items())


def one_of(*choices, **aliases):
    """A check: one of choices (or of the aliases, other names of a choice), in any case; the value is the choice."""
    def check(value):
        text = str(value).strip().lower()
        if text not in choices and text not in aliases:
            raise ValueError("must be %s, not %r%s" % (or_list(choices), value, did_you_mean(text, choices)))
        return aliases.get(text, text)
    return check


def check_url(value):
    """A check: an http:// or https:// URL with a host, and a port from 1 to 65535 if it names one."""
    text = str(value).strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL, not %r" % text)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("must be a URL with a port from 1 to 65535, not %r" % text)
    return text


def non_negative(value):
    """A check: a number, 0 or more (seconds, a rate), as a float."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number >= 0:
        raise ValueError("must be a number, 0 or more, not %r" % (value,))
    return number


def whole(minimum=0):
    """A check: a whole number, minimum or more."""
    def check(value):
        number = to_int(value) if not isinstance(value, float) or value.is_integer() else None
        if number is None or number < minimum:
            raise ValueError("must be a whole number, %d or more, not %r" % (minimum, value))
        return number
    return check


def check_port(value):
    """A check: a port number from 1 to 65535."""
    port = to_int(value)
    if port is None or not 1 <= port <= 65535:
        raise ValueError("must be a port from 1 to 65535, not %r" % value)
    return port


def yes_no_auto(value):
    """A check: a yes/no word (yes_no), or auto."""
    text = str(value).strip().lower()
    if text != "auto" and yes_no(text) is None:
        raise ValueError("must be yes, no or auto, not %r%s" % (value, did_you_mean(text, ("yes", "no", "auto"))))
    return text


def qr_modes(value):
    """The modes of a qrcode_display value, comma-separated; ValueError for an unknown one, or none with others."""
    modes = [mode.strip().lower() for mode in str(value or "").split(",") if mode.strip()]
    for mode in modes:
        if mode not in QR_MODES:
            raise ValueError("must name %s (comma-separated), not %r%s" % (
                or_list(QR_MODES), mode, did_you_mean(mode, QR_MODES)))
    if "none" in modes and len(modes) > 1:
        raise ValueError("can't be none and something else: %r" % value)
    return modes


def check_qr_modes(value):
    """A check: a qrcode_display value."""
    return ",".join(qr_modes(value)) or "none"


# log_level: the names of LOG_LEVELS, warning another name of warn
check_log_level = one_of(*(name for name in LOG_LEVELS if name != "warning"), warning="warn")


FACES = {
    0: "惊讶", 1: "撇嘴", 2: "色", 3: "发呆", 4: "得意", 5: "流泪", 6: "害羞", 7: "闭嘴", 8: "睡",
    9: "大哭", 10: "尴尬", 11: "发怒", 12: "调皮", 13: "呲牙", 14: "微笑", 21: "飞吻", 23: "跳跳",
    25: "发抖", 26: "怄火", 27: "爱情", 29: "足球", 32: "西瓜", 33: "玫瑰", 34: "凋谢", 36: "爱心",
    37: "心碎", 38: "蛋糕", 39: "礼物", 42: "太阳", 45: "月亮", 46: "强", 47: "弱", 50: "难过",
    51: "酷", 53: "抓狂", 54: "吐", 55: "惊恐", 56: "流汗", 57: "憨笑", 58: "大兵", 59: "猪头",
    62: "拥抱", 63: "咖啡", 64: "饭", 71: "握手", 72: "便便", 73: "偷笑", 74: "可爱", 75: "白眼",
    76: "傲慢", 77: "饥饿", 78: "困", 79: "奋斗", 80: "咒骂", 81: "疑问", 82: "嘘", 83: "晕",
    84: "折磨", 85: "衰", 86: "骷髅", 87: "敲打", 88: "再见", 91: "闪电", 92: "炸弹", 93: "刀",
    95: "胜利", 96: "冷汗", 97: "擦汗", 98: "抠鼻", 99: "鼓掌", 100: "糗大了", 101: "坏笑",
    102: "左哼哼", 103: "右哼哼", 104: "哈欠", 105: "鄙视", 106: "委屈", 107: "快哭了", 108: "阴险",
    109: "亲亲", 110: "吓", 111: "可怜", 112: "菜刀", 113: "啤酒", 114: "篮球", 115: "乒乓",
    116: "示爱", 117: "瓢虫", 118: "抱拳", 119: "勾引", 120: "拳头", 121: "差劲", 122: "爱你",
    123: "NO", 124: "OK", 125: "转圈", 126: "磕头", 127: "回头", 128: "跳绳", 129: "挥手",
    130: "激动", 131: "街舞", 132: "献吻", 133: "左太极", 134: "右太极", 135: "招财猫",
    136: "双喜", 137: "鞭炮", 138: "灯笼", 139: "发财", 140: "K歌", 141: "购物", 142: "邮件",
    143: "帅", 144: "喝彩", 145: "祈祷", 146: "劲爆", 147: "棒棒糖", 148: "喝奶", 149: "面条",
    150: "香蕉", 151: "飞机", 152: "开车", 153: "高铁左车头", 154: "车厢", 155: "高铁右车头",
    156: "多云", 157: "下雨", 158: "钞票", 159: "熊猫", 160: "灯泡", 161: "风车", 162: "闹钟",
    168: "药", 169: "手枪", 170: "青蛙", 171: "粥", 172: "眨眼睛", 173: "泪奔", 174: "无奈",
    175: "卖萌", 176: "小纠结", 177: "喷血", 178: "斜眼笑", 179: "doge", 180: "惊喜", 181: "骚扰",
    182: "笑哭", 183: "我最美", 184: "河蟹", 185: "羊驼", 187: "幽灵", 188: "蛋", 189: "马赛克",
    190: "菊花", 191: "肥皂", 192: "红包", 193: "大笑", 194: "不开心", 195: "啊", 196: "恐慌",
    197: "冷漠", 198: "呃", 199: "好棒", 200: "拜托", 201: "点赞", 202: "无聊", 203: "托脸",
    204: "吃", 205: "送花", 206: "害怕", 207: "花痴", 208: "小样儿", 209: "脸红", 210: "飙泪",
    211: "我不看", 212: "托腮",
}
FACE_IDS = {name: face_id for face_id, name in FACES.items()}

###############################################################################
# 3. Transport
###############################################################################

# Query parameters whose values are credentials: never written to a log.
SECRET_PARAMS = frozenset((
    "ptwebqq", "vfwebqq", "psessionid", "ptqrtoken", "auth_token", "pt4_token", "pt4_hkey",
    "pt4_ptcz", "bkn", "access_token", "login_sig", "ptsigx", "skey", "group_sig", "token", "r",
))


NO_PROXIES = {"http": None, "https": None}  # requests: ignore the environment's proxies for this call
# What a request raises when the server took it and then stayed silent (urllib wraps them in URLError's reason).
READ_TIMEOUTS = (socket.timeout, TimeoutError) + ((requests.exceptions.ReadTimeout,) if requests is not None else ())


def is_loopback(host, resolve=False):
    """True when host only reaches this machine: localhost, a loopback address, or (resolve=True)
    a name whose every address is a loopback one."""
    host = (host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    if not (resolve and host):
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def os_reason(error):
    """The operating system's words (Connection refused) for an error, found among the errors it wraps;
    else the words of the innermost one (Remote end closed connection without response)."""
    seen, todo, said = set(), [error], None
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        inner = [getattr(e, "reason", None), e.__cause__, e.__context__] + list(e.args)
        if not any(isinstance(i, BaseException) for i in inner) and str(e):
            said = str(e)
        todo += inner
    return said


class TransportError(Exception):
    """An upstream request that got no HTTP answer (refused, reset, timed out).

    `timed_out` is true when the server accepted the request and then stayed silent: it may
    have acted on it, so the request is not safe to repeat blindly.
    """

    def __init__(self, text, timed_out=False):
        Exception.__init__(self, text)
        self.timed_out = timed_out


class Reply(object):
    """What an upstream (or a post_api receiver) answered: status, headers (a dict with lower-case names),
    body bytes, final URL."""

    __slots__ = ("status", "headers", "body", "url")

    def __init__(self, status, headers, body, url):
        self.status, self.headers, self.body, self.url = status, headers, body, url

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        """The body as JSON; ValueError when it isn't."""
        return json.loads(self.body.decode("utf-8"))


def redact_url(url):
    """url with the values of credential parameters replaced by ***, for logs."""
    parts = urllib.parse.urlsplit(url)
    if not parts.query:
        return url
    query = "&".join(
        (k + "=***") if k in SECRET_PARAMS else (k + ("=" + v if v or "=" in pair else ""))
        for pair in parts.query.split("&")
        for k, _, v in [pair.partition("=")])
    return urllib.parse.urlunsplit(parts._replace(query=query))


class _SocketTracker(object):
    """The sockets an Http opened, so that abort() can break a request blocked on one; once closed,
    a socket that a request opens anyway (it began as the Http was closed) is shut at once."""

    def __init__(self):
        self._sockets = weakref.WeakSet()
        self._lock = threading.Lock()
        self.closed = False

    def add(self, sock):
        with self._lock:
            if not self.closed:
                self._sockets.add(sock)
                return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass

    def close(self):
        with self._lock:
            self.closed = True
        self.abort()

    def abort(self):
        with self._lock:
            sockets = list(self._sockets)
            self._sockets.clear()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass


def _requests_session(tracker, jar):
    """A requests.Session whose connections report their sockets to tracker."""
    import requests.adapters
    from urllib3 import connection, connectionpool

    def tracked(base):
        class Tracked(base):
            def _new_conn(self):
                sock = super(Tracked, self)._new_conn()
                tracker.add(sock)
                return sock
        return Tracked

    class HTTPPool(connectionpool.HTTPConnectionPool):
        ConnectionCls = tracked(connection.HTTPConnection)

    class HTTPSPool(connectionpool.HTTPSConnectionPool):
        ConnectionCls = tracked(connection.HTTPSConnection)

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super(Adapter, self).init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    session = requests.Session()
    session.cookies = jar
    session.trust_env = True
    for scheme in ("http://", "https://"):
        session.mount(scheme, Adapter())
    return session


def _urllib_opener(tracker, jar, proxies=None):
    """A urllib opener that keeps cookies in jar, never follows redirects and tracks sockets.

    proxies=None uses the environment's proxy settings; {} uses none.
    """

    def tracked(base):
        class Tracked(base):
            def connect(self):
                base.connect(self)
                tracker.add(self.sock)
        return Tracked

    http_conn, https_conn = tracked(http.client.HTTPConnection), tracked(http.client.HTTPSConnection)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_conn, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_conn, req, context=self._context)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    return urllib.request.build_opener(
        urllib.request.ProxyHandler(proxies), HTTPHandler(), HTTPSHandler(), NoRedirect(),
        urllib.request.HTTPCookieProcessor(jar))


class Http(object):
    """Upstream HTTP: a cookie jar persisted as JSON, per-call timeout and Referer, the address override.

    With `base` set, every URL on a qq.com host (http or https, including redirect targets)
    is sent to base instead, with its path and query unchanged.
    """

    REDIRECTS = 7

    def __init__(self, base=None, timeout=30.0, jar=None, log=None, user_agent=USER_AGENT):
        self.base = base.rstrip("/") if base else None
        self.timeout = timeout
        self.jar = jar if jar is not None else http.cookiejar.CookieJar()
        self.log = log or logging.getLogger("webqq")
        self.user_agent = user_agent
        self._tracker = _SocketTracker()
        if requests is not None:
            self._session = _requests_session(self._tracker, self.jar)
            self._local_session = _requests_session(self._tracker, self.jar)
            self._local_session.trust_env = False   # plain http to loopback: no proxy/netrc lookups per call
        else:
            self._session = None
            self._opener = _urllib_opener(self._tracker, self.jar)
            self._local_opener = _urllib_opener(self._tracker, self.jar, proxies={})

    def route(self, url):
        """The URL actually requested for url: rewritten to base for qq.com hosts."""
        if not self.base:
            return url
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        if host == "qq.com" or host.endswith(".qq.com"):
            return self.base + (parts.path or "/") + ("?" + parts.query if parts.query else "")
        return url

    def get(self, url, params=None, **kwargs):
        """GET url (params appended to its query)."""
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        return self.request("GET", url, **kwargs)

    def post(self, url, data=None, **kwargs):
        """POST a form (dict) or raw bytes to url."""
        return self.request("POST", url, data=data, **kwargs)

    def request(self, method, url, data=None, referer=None, headers=None, timeout=None,
                follow=True):
        """One request, following redirects itself so that each hop is routed; a Reply."""
        hdrs = {"User-Agent": self.user_agent}
        if referer:
            hdrs["Referer"] = referer
        if headers:
            hdrs.update(headers)
        if isinstance(data, dict):
            data = urllib.parse.urlencode(data).encode("utf-8")
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        timeout = timeout or self.timeout
        for _ in range(self.REDIRECTS + 1):
            real = self.route(url)
            started = time.time()
            res = self._send(method, real, data, hdrs, timeout)
            self.log.debug("%s %s -> %s (%.0f ms)", method, redact_url(url), res.status,
                           (time.time() - started) * 1000)
            location = res.headers.get("location")
            if not (follow and res.status in (301, 302, 303, 307, 308) and location):
                res.url = url
                return res
            url = urllib.parse.urljoin(url, location)
            if res.status in (301, 302, 303):
                method, data = "GET", None
                hdrs.pop("Content-Type", None)
        raise TransportError("too many redirects: " + redact_url(url))

    def _send(self, method, url, data, headers, timeout):
        if self._tracker.closed:
            raise TransportError("%s %s: closed" % (method, redact_url(url)))
        local = is_loopback(urllib.parse.urlsplit(url).hostname)
        try:
            if self._session is not None:
                session = self._local_session if local and url.startswith("http:") else self._session
                r = session.request(method, url, data=data, headers=headers,
                                    timeout=(min(10.0, timeout), timeout), allow_redirects=False,
                                    proxies=NO_PROXIES if local else None)
                return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()},
                                r.content, url)
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                f = (self._local_opener if local else self._opener).open(req, timeout=timeout)
            except urllib.error.HTTPError as e:
                f = e
            with f:
                return Reply(f.getcode() if hasattr(f, "getcode") else f.code,
                                {k.lower(): v for k, v in f.headers.items()}, f.read(), url)
        except TransportError:
            raise
        except Exception as e:  # requests / urllib / socket errors all mean "no answer"
            timed_out = isinstance(e, READ_TIMEOUTS) or isinstance(getattr(e, "reason", None), READ_TIMEOUTS)
            reason = os_reason(e)
            raise TransportError("%s %s: %s%s" % (method, redact_url(url), e.__class__.__name__,
                                                   " (%s)" % reason if reason else ""), timed_out)

    def abort(self):
        """Break every request in progress (they raise TransportError); the Http stays usable."""
        self._tracker.abort()

    def close(self):
        """Break every request in progress and refuse new ones (TransportError); release pooled connections."""
        self._tracker.close()
        if self._session is not None:
            self._session.close()
            self._local_session.close()

    # -- cookies --------------------------------------------------------------

    def cookie(self, name):
        """The value of the first cookie called name, or None."""
        for c in self.jar:
            if c.name == name:
                return c.value
        return None

    def set_cookie(self, name, value, domain="qq.com", path="/"):
        """Store a cookie as if the server had set it (host-only on the override's host)."""
        if self.base:
            domain, specified = urllib.parse.urlsplit(self.base).hostname, False
        else:
            specified = True
        for c in list(self.jar):
            if c.name == name and c.domain.lstrip(".") == domain.lstrip("."):
                self.jar.clear(c.domain, c.path, c.name)
        self.jar.set_cookie(http.cookiejar.Cookie(
            0, name, value, None, False, domain, specified, specified and domain.startswith("."),
            path, True, False, None, False, None, None, {}))

    def save_cookies(self, path):
        """Write the jar to path as JSON (mode 0600); a failure is logged, and the client goes on."""
        cookies = [{"name": c.name, "value": c.value, "domain": c.domain, "path": c.path,
                    "secure": c.secure, "expires": c.expires,
                    "domain_specified": c.domain_specified} for c in self.jar]
        save_file(path, json.dumps(cookies, indent=1), self.log, ("cookie文件", "cookie"))

    def load_cookies(self, path):
        """Read a jar written by save_cookies; False when there is none, it is unreadable, or it is not ours."""
        try:
            with open(path, "rb") as f:
                if hasattr(os, "geteuid") and os.fstat(f.fileno()).st_uid != os.geteuid():
                    self.log.warning("cookie文件属于其他用户，不使用 (%s belongs to another user: not used)", path)
                    return False
                cookies = json.loads(f.read().decode("utf-8"))
            for c in cookies:
                domain = c["domain"]
                self.jar.set_cookie(http.cookiejar.Cookie(
                    0, c["name"], c["value"], None, False, domain, c.get("domain_specified", True),
                    domain.startswith("."), c.get("path", "/"), True, c.get("secure", False),
                    c.get("expires"), False, None, None, {}))
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def clear_cookies(self):
        self.jar.clear()


###############################################################################
# 4. Model
###############################################################################


class Model(object):
    """Base of the contact classes: every slot defaults to None; FIELDS are what to_json shows."""

    __slots__ = ()
    FIELDS = ()
    # Fields another request fills in (QQ numbers, a group's detail): a refresh without them keeps them.
    STICKY = ("uid", "role", "owner_uid", "join_time", "last_speak_time", "owner_id", "memo", "createtime",
              "level", "max_member", "max_admin")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.pop(name, None))
        if fields:
            raise TypeError("%s has no field %s" % (type(self).__name__, ", ".join(sorted(fields))))

    def to_json(self):
        return {name: getattr(self, name) for name in self.FIELDS}

    def update(self, other):
        """Copy other's FIELDS into self; the list of (field, old, new) that changed."""
        changes = []
        for name in self.FIELDS:
            old, new = getattr(self, name), getattr(other, name)
            if old == new or (new is None and name in self.STICKY):
                continue
            setattr(self, name, new)
            changes.append((name, old, new))
        return changes

    def __repr__(self):
        return "<%s %s %r>" % (type(self).__name__, self.id, self.name)


class User(Model):
    """The logged-in account."""

    FIELDS = ("account", "allow", "birthday", "blood", "city", "client_type", "college", "constel",
              "country", "email", "face", "homepage", "id", "mobile", "name", "occupation",
              "personal", "phone", "province", "sex", "shengxiao", "signature", "state", "uid",
              "vip_info")
    __slots__ = FIELDS

    @property
    def displayname(self):
        return self.name


class Friend(Model):
    """A friend; `placeholder` marks a stranger made up for an unknown sender."""

    FIELDS = ("category", "client_type", "face", "flag", "id", "is_vip", "markname", "name",
              "state", "uid", "vip_level")
    __slots__ = FIELDS + ("placeholder",)

    @property
    def displayname(self):
        return self.markname if self.markname is not None else self.name


class Container(Model):
    """A group or a discussion group: a model with members; to_json(members=False) leaves them out."""

    __slots__ = ()

    def __init__(self, **fields):
        Model.__init__(self, **fields)
        self.members = self.members or []

    def to_json(self, members=True):
        data = Model.to_json(self)
        if members:
            data["member"] = [m.to_json() for m in self.members]
        return data


class Group(Container):
    """A group, with its members once they are loaded.

    `markname` stays None, as in the original (a group is named by its name everywhere); the
    account's private remark for the group, where the upstream gives one, is `remark`, ours.
    """

    FIELDS = ("code", "createtime", "id", "level", "markname", "max_admin", "max_member", "memo",
              "name", "owner_id", "owner_uid", "remark", "role", "uid")
    __slots__ = FIELDS + ("members", "members_loaded", "contacts")

    def __init__(self, **fields):
        Container.__init__(self, **fields)
        self.members_loaded = bool(self.members_loaded)

    @property
    def displayname(self):
        return self.name


class GroupMember(Model):
    """A member of a group; `group` points back to it."""

    FIELDS = ("card", "city", "client_type", "country", "id", "join_time", "last_speak_time",
              "name", "province", "role", "sex", "state", "uid")
    __slots__ = FIELDS + ("group", "placeholder")

    @property
    def displayname(self):
        group = self.group
        contacts = group.contacts if group is not None else None
        if contacts is not None and contacts.use_friend_markname:
            friend = contacts.friend(self.id)
            if friend is not None and friend.markname is not None:
                return friend.markname
        return self.card if self.card is not None else self.name


class Discuss(Container):
    """A discussion group with its members."""

    FIELDS = ("id", "name", "owner_id")
    __slots__ = FIELDS + ("members", "contacts")

    @property
    def displayname(self):
        return self.name


class DiscussMember(Model):
    """A member of a discussion group; its id is a string, as in the original."""

    FIELDS = ("client_type", "id", "name", "state", "uid")
    __slots__ = FIELDS + ("discuss", "placeholder")

    @property
    def displayname(self):
        discuss = self.discuss
        contacts = discuss.contacts if discuss is not None else None
        if contacts is not None:
            friend = contacts.friend(to_int(self.id))
            if friend is not None and friend.markname is not None:
                return friend.markname
        return self.name


def _matches(obj, attrs):
    """True when every (name, text) of attrs equals str() of obj's attribute of that name."""
    for name, text in attrs:
        if name.startswith("_"):
            return False
        value = getattr(obj, name, None)
        if value is None or callable(value) or str(value) != text:
            return False
    return True


class Contacts(object):
    """Every contact of the account: one lock, lookups by any attribute, diffs that yield events.

    Mutating methods return a list of (event, args) for the client to emit.
    """

    INDEXED = ("id", "uid", "name", "displayname", "markname", "card")

    KINDS = ("user", "friend", "group", "discuss")

    def __init__(self, use_friend_markname=True):
        self.lock = threading.RLock()
        self.use_friend_markname = use_friend_markname
        self.user = User()
        self.version = 0  # increases on every change
        self.versions = dict.fromkeys(self.KINDS, 0)  # increases on every change of that kind
        self._friends, self._groups, self._discusses = [], [], []
        self._friend_ids, self._group_ids, self._discuss_ids = {}, {}, {}
        self._indexes = {}

    def changed(self, *kinds):
        """Note a change of these kinds (default: all) made in place, e.g. a field of a model object."""
        with self.lock:
            self.version += 1
            for kind in kinds or self.KINDS:
                self.versions[kind] += 1
            self._indexes.clear()

    # -- reading --------------------------------------------------------------

    def friends(self):
        with self.lock:
            return list(self._friends)

    def groups(self):
        with self.lock:
            return list(self._groups)

    def discusses(self):
        with self.lock:
            return list(self._discusses)

    def friend(self, id):
        return self._friend_ids.get(id)

    def group(self, id):
        return self._group_ids.get(id)

    def discuss(self, id):
        return self._discuss_ids.get(id)

    def search_friend(self, **attrs):
        return self._search("friend", self._friends, attrs)

    def search_group(self, **attrs):
        return self._search("group", self._groups, attrs)

    def search_discuss(self, **attrs):
        return self._search("discuss", self._discusses, attrs)

    def search_group_member(self, group, **attrs):
        return self._search(("member", id(group)), group.members, attrs)

    def search_discuss_member(self, discuss, **attrs):
        return self._search(("member", id(discuss)), discuss.members, attrs)

    def _search(self, key, objects, attrs):
        attrs = [(k, str(v)) for k, v in attrs.items() if v is not None]
        if not attrs:
            return []
        with self.lock:
            name, text = next(((k, v) for k, v in attrs if k in self.INDEXED), attrs[0])
            if name in self.INDEXED:
                index = self._indexes.get((key, name))
                if index is None:
                    index = self._indexes[(key, name)] = {}
                    for obj in objects:
                        value = getattr(obj, name, None)
                        if value is not None:
                            index.setdefault(str(value), []).append(obj)
                objects = index.get(text, ())
            return [obj for obj in objects if _matches(obj, attrs)]

    # -- changing -------------------------------------------------------------

    def clear(self):
        """Forget everything (a relogin may give every contact a new id)."""
        with self.lock:
            self.user = User()
            self._friends, self._groups, self._discusses = [], [], []
            self._reindex(*self.KINDS)

    def _reindex(self, *kinds):
        self._friend_ids = {f.id: f for f in self._friends}
        self._group_ids = {g.id: g for g in self._groups}
        self._discuss_ids = {d.id: d for d in self._discusses}
        self.changed(*kinds)

    @staticmethod
    def _merge(old_list, new_list, kind, container=None):
        """Merge new_list into old_list by id: (merged list, events)."""
        extra = (container,) if container is not None else ()
        old_ids = {o.id: o for o in old_list}
        merged, events, seen = [], [], set()
        for new in new_list:
            seen.add(new.id)
            old = old_ids.get(new.id)
            if old is None:
                merged.append(new)
                events.append(("new_" + kind, (new,) + extra))
            else:
                for field, before, after in old.update(new):
                    events.append((kind + "_property_change", (old, field, before, after)))
                merged.append(old)
        events.extend(("lose_" + kind, (old,) + extra) for old in old_list if old.id not in seen)
        return merged, events

    def set_user(self, user, diff=True):
        with self.lock:
            if not diff or self.user.id is None:
                self.user = user
                self.changed("user")
                return []
            events = [("user_property_change", (self.user,) + change) for change in self.user.update(user)]
            self.changed("user")
            return events

    def set_friends(self, friends, diff=True):
        with self.lock:
            self._friends, events = self._merge(self._friends, friends, "friend")
            self._reindex("friend")
            return events if diff else []

    def set_groups(self, groups, diff=True):
        """Replace the group list; groups already known keep their members."""
        with self.lock:
            for g in groups:
                g.contacts = self
            self._groups, events = self._merge(self._groups, groups, "group")
            self._reindex("group")
            return events if diff else []

    def set_group_members(self, group, fields, members):
        """Store a group's detail fields (a dict) and members; events only once loaded before."""
        with self.lock:
            diff = group.members_loaded
            events = []
            for name, value in fields.items():
                old = getattr(group, name)
                if value is None or value == old:
                    continue
                setattr(group, name, value)
                events.append(("group_property_change", (group, name, old, value)))
            for m in members:
                m.group = group
            group.members, member_events = self._merge(group.members, members, "group_member", group)
            group.members_loaded = True
            self.changed("group")
            return events + member_events if diff else []

    def set_discusses(self, discusses, diff=True):
        with self.lock:
            events = []
            old_ids = {d.id: d for d in self._discusses}
            for d in discusses:
                d.contacts = self
                for m in d.members:
                    m.discuss = d
                old = old_ids.get(d.id)
                if old is not None:
                    for m in d.members:
                        m.discuss = old
                    old.members, member_events = self._merge(old.members, d.members, "discuss_member", old)
                    events.extend(member_events)
            self._discusses, list_events = self._merge(self._discusses, discusses, "discuss")
            self._reindex("discuss")
            return list_events + events if diff else []

    def set_friend_state(self, id, state, client_type=None):
        """A friend's presence changed: the friend, or None when unknown."""
        with self.lock:
            friend = self._friend_ids.get(id)
            if friend is not None:
                friend.state = state
                if client_type is not None:
                    friend.client_type = client_type
                self.changed("friend")
            return friend

    def add_friend(self, friend):
        return self._add("friend", self._friends, friend)

    def add_group(self, group):
        group.contacts = self
        return self._add("group", self._groups, group)

    def remove_group(self, id):
        return self._remove("group", self._groups, id)

    def add_group_member(self, group, member):
        member.group = group
        return self._add("group_member", group.members, member, group)

    def remove_group_member(self, group, id):
        return self._remove("group_member", group.members, id, group)

    def _add(self, kind, items, obj, container=None):
        """Append obj to items (a list of this store) unless one with its id is there: its new_<kind> event."""
        with self.lock:
            if any(item.id == obj.id for item in items):
                return []
            items.append(obj)
            return self._changed_by("new_", kind, obj, container)

    def _remove(self, kind, items, id, container=None):
        """Remove the object with this id from items: its lose_<kind> event."""
        with self.lock:
            for obj in items:
                if obj.id == id:
                    items.remove(obj)
                    return self._changed_by("lose_", kind, obj, container)
            return []

    def _changed_by(self, prefix, kind, obj, container):
        self._reindex("friend" if kind == "friend" else "group")
        return [(prefix + kind, (obj,) if container is None else (obj, container))]

###############################################################################
# 5. Messages
###############################################################################

FONT = {"name": "宋体", "size": 10, "style": [0, 0, 0], "color": "000000"}
GARBAGE_FONT = " \0\n\0\0\0\0\u0002宋体\r"  # Mojo drops group messages whose first text is this
FACE_TOKEN = re.compile(r"\[([^\[\]\s]{1,8})\]")


def flatten_content(content):
    """Received content segments as the original's text: faces by name, pictures as [图片]."""
    if isinstance(content, str):
        return content
    parts, only_font = [], bool(content)
    for seg in content or ():
        if isinstance(seg, str):
            only_font = False
            parts.append(html.unescape(seg.replace("&nbsp;", " ")).replace("\r\n", "\n").replace("\r", "\n"))
        elif isinstance(seg, list) and seg and seg[0] == "font":
            continue
        else:
            only_font = False
            kind = seg[0] if isinstance(seg, list) and seg else None
            if kind == "face":
                face = to_int(seg[1] if len(seg) > 1 else None)
                parts.append("[%s]" % ((FACES.get(face) if face else None) or "表情"))
            elif kind in ("cface", "offpic"):
                parts.append("[图片]")
            else:
                parts.append("[未识别内容]")
    return "[图片]" if only_font else "".join(parts)


def encode_content(text):
    """Text to send as SmartQQ segments: [name] faces become ["face", id], the font goes last."""
    segments, pos = [], 0
    for m in FACE_TOKEN.finditer(text):
        face = FACE_IDS.get(m.group(1))
        if face is None:
            continue
        if m.start() > pos:
            segments.append(text[pos:m.start()])
        segments.append(["face", face])
        pos = m.end()
    if pos < len(text):
        segments.append(text[pos:])
    segments.append(["font", FONT])
    return segments


class Message(object):
    """A message received or sent; to_json() gives the original's report keys and types.

    `from_` is the report's `from` (who asked for the send: "api", "code", ...), `source`
    is "local" for our own sends and "outer" for our messages sent from another device.
    """

    __slots__ = ("id", "type", "cls", "time", "content", "raw_content", "sender", "receiver",
                 "group", "discuss", "via", "from_", "source", "ttl", "code", "msg", "info",
                 "callback", "_done")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.pop(name, None))
        if fields:
            raise TypeError("Message has no field %s" % ", ".join(sorted(fields)))
        self._done = threading.Event()
        if self.time is None:
            self.time = int(time.time())

    def wait(self, timeout=None):
        """Block until the send's final status is known; True if it is."""
        return self._done.wait(timeout)

    @property
    def done(self):
        return self._done.is_set()

    @property
    def place(self):
        """The group or discussion the message belongs to, or None."""
        return self.group or self.discuss

    @property
    def addressee(self):
        """Whom a sent message goes to: the friend or member for private ones, else its place."""
        return self.receiver if self.type in ("friend_message", "sess_message") else self.place

    def finish(self, code, info):
        """Record the final status of a send."""
        self.code, self.info = code, info
        self.msg = SEND_OK if code == 0 else SEND_FAILED
        self._done.set()

    def to_json(self):
        data = {"class": self.cls, "id": self.id, "type": self.type, "time": self.time,
                "content": self.content}
        for key in ("sender", "receiver", "group"):
            obj = getattr(self, key)
            if obj is not None:
                data[key], data[key + "_id"], data[key + "_uid"] = obj.displayname, obj.id, obj.uid
        if self.cls == "recv":  # the poll's numbers, even for a discussion member (whose id is a string)
            for key in ("sender_id", "receiver_id"):
                if key in data:
                    data[key] = to_int(data[key], data[key])
        if self.discuss is not None:
            data["discuss"], data["discuss_id"] = self.discuss.displayname, self.discuss.id
        if self.via is not None:
            data["via"] = self.via
        if self.cls == "send":
            data.update({"from": self.from_, "ttl": self.ttl, "source": self.source,
                         "code": self.code, "msg": self.msg, "info": self.info})
        return data

    def __repr__(self):
        return "<Message %s %s %s %r>" % (self.cls, self.type, self.id, self.content)


###############################################################################
# 6. Events
###############################################################################


class EventEmitter(object):
    """on(name, fn) / emit(name, *args): handlers run in order; one that raises is logged."""

    def __init__(self, log=None):
        self.log = log or logging.getLogger("webqq")
        self._handlers = {}
        self._handlers_lock = threading.Lock()

    def on(self, name, fn):
        """Subscribe fn to name ("all_event" gets every event as fn(name, *args)); returns fn."""
        with self._handlers_lock:
            self._handlers[name] = self._handlers.get(name, ()) + (fn,)
        return fn

    def off(self, name, fn):
        """Unsubscribe fn from name (a bound method is the same handler each time it is named: ==, not is)."""
        with self._handlers_lock:
            self._handlers[name] = tuple(h for h in self._handlers.get(name, ()) if h != fn)

    def emit(self, name, *args):
        for fn in self._handlers.get(name, ()):
            self._call(name, fn, args)
        for fn in self._handlers.get("all_event", ()):
            self._call(name, fn, (name,) + args)

    def _call(self, name, fn, args):
        try:
            fn(*args)
        except Exception:
            self.log.exception("handler %s of event %s failed", getattr(fn, "__name__", fn), name)

###############################################################################
# 7. Upstreams
###############################################################################


class LoginFailed(Exception):
    """Login did not succeed; `fatal` when trying again would fail the same way."""

    def __init__(self, text, fatal=True):
        Exception.__init__(self, text)
        self.fatal = fatal


class NeedRelogin(Exception):
    """The session is gone: the client must log in again."""


class Stopped(Exception):
    """The client is stopping: give up what you are doing."""


class UpstreamError(Exception):
    """An upstream API answered with an error code (-1: not with an answer of the API at all, and
    then the text alone says what came)."""

    def __init__(self, code, text=""):
        Exception.__init__(self, text if code == -1 and text else "retcode %s%s" % (code, ": " + text if text else ""))
        self.code = code


class Upstream(object):
    """What a backend implements for the client (docs/internals.md gives the contract of each method).

    A subclass defines every method of REQUIRED; logout(), interrupt() and close() may stay as they are.
    """

    name = "upstream"
    REQUIRED = ("login", "fetch_user", "fetch_friends", "fetch_groups", "fetch_group_detail", "fetch_discusses",
                "poll", "send", "shutup", "kick")
    # True when contact ids outlive a login (QQ numbers): a relogin then compares the contacts before
    # and after, and reports the difference; otherwise it forgets them, since every id may change.
    stable_ids = False
    qr_login = True  # login() shows QR codes to scan (client.show_qrcode); False: the upstream logs in by itself

    def __init__(self, client):
        missing = [name for name in self.REQUIRED if not callable(getattr(self, name, None))]
        if missing:
            raise TypeError("upstream %s lacks %s" % (type(self).__name__, ", ".join(missing)))
        self.client = client
        self.log = client.log
        self.uid = None  # the account's QQ number once logged in

    def fetch_group(self, id):
        """A group fetch_groups() left out (a message came from it), without members; None when this
        upstream can't ask for one group, UpstreamError when it doesn't know that one."""
        return None

    def logout(self):
        """End the session upstream (a relogin starts with this)."""

    def interrupt(self):
        """Break a poll() in progress; the upstream stays usable."""

    def close(self):
        """Break every request in progress and save what must survive a restart."""


def final_status(msg, code, info):
    """(code, info) of a send that trying again cannot change: msg has no attempts left."""
    msg.ttl = 0
    return code, info


def send_status(body):
    """(code, info) of a send answer, with the original's codes (Mojo parse_send_status_msg)."""
    if not isinstance(body, dict):
        return -1, "数据格式错误"
    if body.get("errCode") == 0 and body.get("msg") == "send ok":
        return 0, "发送正常"
    retcode = body.get("retcode")
    if retcode == 0:
        return 0, "发送正常"
    if retcode in SEND_IGNORED:
        return 0, "忽略返回值: %s" % retcode
    if body.get("errMsg") == "ERROR":
        return -3, "发送异常"
    if "errCode" in body:
        return -4, "响应未知: " + json_dumps(body)
    if retcode is not None:
        return -5, "未识别返回值:%s" % retcode
    return -2, "响应未知: " + json_dumps(body)


def _unique_by(items, key):
    """{key(item): item} for the keys that occur exactly once."""
    found, dupes = {}, set()
    for item in items:
        k = key(item)
        if k in found:
            dupes.add(k)
        found[k] = item
    return {k: v for k, v in found.items() if k not in dupes}


# Told once when what answers at w.qq.com (or smartqq_base) is not SmartQQ; %s: what happened.
SMARTQQ_GONE = """SmartQQ无法访问 (SmartQQ cannot be reached: %s)
  腾讯已于2019年1月1日关闭SmartQQ (w.qq.com)，真实的QQ帐号无法再通过它登录。
  Tencent closed SmartQQ (w.qq.com) on 2019-01-01: no real QQ account can log in through it any more.
    试用 (to try webqq):        python webqq.py --demo   (installed: webqq --demo)
    真实帐号 (a real account):  NapCat or LLOneBot, and upstream = onebot in webqq.ini: see README.md,
                                section "Living QQ accounts: OneBot", and docs/onebot.md
  webqq keeps trying (smartqq_base may name a simulator that is still starting); Ctrl-C stops it."""


class SmartQQ(Upstream):
    """The w.qq.com web protocol: QR login, contacts, poll2, sends, qinfo group admin."""

    name = "smartqq"
    SHARED_FILE = re.compile(r'<n t="t" s="共享文件"/>.*<n t="t" s="([^"]*)"/>', re.S)

    def __init__(self, client):
        Upstream.__init__(self, client)
        opts = client.options
        jar = http.cookiejar.CookieJar()
        base = opts.get("smartqq_base")
        self.http = Http(base, timeout=opts["http_timeout"], jar=jar, log=self.log)
        self.poll_http = Http(base, timeout=opts["poll_timeout"], jar=jar, log=self.log)
        if opts["keep_cookie"]:
            self.http.load_cookies(client.cookie_path)
        self.told_gone = False
        self._reset_session()

    def _reset_session(self):
        self.ptwebqq = self.vfwebqq = self.psessionid = None
        self.face = None
        self.poll_failures = 0
        self._bkn = None
        self._sess_sigs = {}

    # -- requests -------------------------------------------------------------

    def _call(self, method, url, referer=None, data=None, retries=3, timeout=None):
        """A request retried (with backoff) when it gets no answer or a 5xx; the Reply."""
        for attempt in range(1, retries + 1):
            try:
                res = self.http.request(method, url, data=data, referer=referer, timeout=timeout)
                if res.status < 500 or attempt == retries:
                    return res
            except TransportError:
                if attempt == retries or self.client.stopping:
                    raise
            if not self.client.sleep(min(0.25 * 2 ** attempt, 4.0)):
                raise Stopped()

    def _api(self, method, url, referer, data=None, retries=3):
        """A SmartQQ JSON call: its `result`, or UpstreamError."""
        if isinstance(data, dict):
            data = {"r": json.dumps(data, ensure_ascii=False)}
        res = self._call(method, url, referer, data, retries)
        try:
            body = res.json()
        except ValueError:
            raise UpstreamError(-1, "HTTP %s, not JSON" % res.status)
        if not isinstance(body, dict):
            raise UpstreamError(-1, "unexpected answer")
        retcode = body.get("retcode", body.get("errCode", 0))
        if retcode != 0 or "result" not in body:
            raise UpstreamError(retcode, body.get("errmsg") or "")
        return body["result"]

    def _qun(self, url, form, referer):
        """A qun.qq.com / qinfo.clt.qq.com call, authorised by bkn(skey): its JSON, or UpstreamError."""
        if self._bkn is None:
            self._bkn = bkn(self.http.cookie("skey") or "")
        form = dict(form, bkn=self._bkn)
        res = self._call("POST", url, referer, form)
        try:
            body = res.json()
        except ValueError:
            raise UpstreamError(-1, "HTTP %s, not JSON" % res.status)
        if not isinstance(body, dict) or body.get("ec") != 0:
            raise UpstreamError(body.get("ec", -1) if isinstance(body, dict) else -1)
        return body

    def _t(self):
        return int(time.time() * 1000)

    # -- login ----------------------------------------------------------------

    def login(self):
        self._reset_session()
        try:
            self._prepare()
        except (UpstreamError, TransportError) as e:
            raise LoginFailed(self._gone(e), fatal=False)
        try:
            url = self._resume_url()
            if url:
                try:
                    self._finish_login(url)
                    self.log.info("已通过cookie恢复登录，无需扫码 (session resumed from cookies)")
                    return False
                except (UpstreamError, TransportError, LoginFailed) as e:
                    self.log.info("cookie恢复登录失败 (%s)，改用二维码登录", e)
                    self.http.clear_cookies()
                    self._prepare()
            self._finish_login(self._qr_login())
            return True
        except (UpstreamError, TransportError) as e:
            raise LoginFailed("登录失败: %s" % e, fatal=False)

    def _prepare(self):
        """Open w.qq.com and its login frame; UpstreamError when what answers there is not SmartQQ."""
        sig = self.http.cookie("pt_login_sig")
        for url, referer in (("http://w.qq.com/", None), (XLOGIN, "http://w.qq.com/")):
            res = self._call("GET", url, referer=referer)
            if res.status != 200:
                raise UpstreamError(-1, "%s answered HTTP %d" % (url.split("?")[0], res.status))
        if self.http.cookie("pt_login_sig") in (None, sig):
            raise UpstreamError(-1, "the login page set no pt_login_sig")

    def _gone(self, error):
        """The text of a login that found no SmartQQ: the whole story is logged the first time."""
        if not self.told_gone:
            self.told_gone = True
            self.log.warning(SMARTQQ_GONE, error)
        return "SmartQQ无法访问 (SmartQQ cannot be reached: %s)" % error

    def _resume_url(self):
        """A check_sig URL from pt4_auth when saved cookies still hold a session, else None."""
        token = self.http.cookie("supertoken")
        if not (token and self.http.cookie("superuin")):
            return None
        res = self._call("GET", "https://ssl.ptlogin2.qq.com/pt4_auth?daid=%d&appid=%d&auth_token=%d"
                         % (DAID, APPID, time33(token)), referer=XLOGIN)
        args = quoted_args(res.text)
        if len(args) > 1 and re.match(r"^https?://[^/]+\.qq\.com/check_sig", args[1]):
            return args[1] + "&regmaster=&aid=%d&s_url=http%%3A%%2F%%2Fw.qq.com%%2Fproxy.html" % APPID
        return None

    def _qr_login(self):
        """Show QR codes until one is scanned and confirmed: the check_sig URL."""
        client, expired = self.client, 0
        while True:
            res = self._call("GET", "https://ssl.ptlogin2.qq.com/ptqrshow?appid=%d&e=2&l=M&s=3&d=72&v=4"
                             "&t=%s&daid=%d&pt_3rd_aid=0" % (APPID, random.random(), DAID), XLOGIN)
            if res.status != 200 or not res.body.startswith(b"\x89PNG") or not self.http.cookie("qrsig"):
                raise UpstreamError(-1, "ptqrshow answered HTTP %s without a PNG and its qrsig" % res.status)
            shown = time.time()
            client.show_qrcode(res.body)
            token = hash33(self.http.cookie("qrsig"))
            while True:
                url = ("https://ssl.ptlogin2.qq.com/ptqrlogin?u1=http%%3A%%2F%%2Fw.qq.com%%2Fproxy.html"
                       "&ptqrtoken=%d&ptredirect=0&h=1&t=1&g=1&from_ui=1&ptlang=2052&action=0-0-%d"
                       "&js_ver=%d&js_type=1&login_sig=%s&pt_uistyle=40&aid=%d&daid=%d&mibao_css=m_webqq&"
                       % (token, (time.time() - shown) * 1000, JS_VER,
                          self.http.cookie("pt_login_sig") or "", APPID, DAID))
                args = quoted_args(self._call("GET", url, XLOGIN).text)
                if not args:  # a gateway's error page or a cut answer: no verdict on the QR
                    raise UpstreamError(-1, "ptqrlogin answered without ptuiCB(...)")
                code = args[0]
                if code == "66":
                    client.set_state("scaning")
                elif code == "67":
                    if client.state != "confirming":
                        client.log.info("手机扫码成功，请在手机上点击[登录]按钮 (tap Allow on the phone)")
                    client.set_state("confirming")
                elif code == "65":
                    expired += 1
                    client.emit("qrcode_expire")
                    if expired >= client.options["qrcode_count_max"]:
                        raise LoginFailed("二维码已失效%d次，客户端停止运行 (too many expired QR codes)" % expired)
                    client.log.info("二维码已失效，重新获取二维码 (QR code expired, fetching a new one)")
                    break
                elif code == "0" and len(args) > 2:
                    self.uid = to_int(re.sub(r"^o0*", "", self.http.cookie("uin") or ""))
                    account = client.account
                    if client.options["check_account"] and account.isdigit() and self.uid != int(account):
                        raise LoginFailed("扫码帐号(%s)与设置帐号(%s)不一致" % (self.uid, account))
                    return args[2]
                else:
                    text = args[4] if len(args) > 4 else (code or "no answer")
                    raise LoginFailed("%s，客户端终止运行 (ptqrlogin %s)" % (text, code))
                if not client.sleep(client.options["qr_check_interval"]):
                    raise Stopped()

    def _finish_login(self, check_sig_url):
        """check_sig, getvfwebqq, login2 and the get_online_buddies2 that registers the session."""
        res = self._call("GET", check_sig_url)
        if res.status >= 400:
            raise LoginFailed("check_sig answered HTTP %s" % res.status, fatal=False)
        self.uid = self.uid or to_int(re.sub(r"^o0*", "", self.http.cookie("uin") or ""))
        self.ptwebqq = self.http.cookie("ptwebqq") or ""
        self.vfwebqq = self._api("GET", "https://s.web2.qq.com/api/getvfwebqq?ptwebqq=%s&clientid=%d"
                                 "&psessionid=&t=%d" % (self.ptwebqq, CLIENTID, self._t()), S_REF)["vfwebqq"]
        result = self._api("POST", "http://d1.web2.qq.com/channel/login2", D_REF, {
            "ptwebqq": self.ptwebqq, "clientid": CLIENTID, "psessionid": "",
            "status": self.client.options["mode"]})
        if self.uid and result.get("uin") not in (None, self.uid):
            raise LoginFailed("login2 returned another account (%s)" % result.get("uin"))
        self.psessionid, self.uid = result["psessionid"], result.get("uin", self.uid)
        self._online_buddies()
        if self.client.options["keep_cookie"]:
            self.http.save_cookies(self.client.cookie_path)

    def _online_buddies(self):
        """{uin: (state, client_type)} of online friends; also keeps the session registered."""
        result = self._api("GET", "http://d1.web2.qq.com/channel/get_online_buddies2?vfwebqq=%s&clientid=%d"
                           "&psessionid=%s&t=%d" % (self.vfwebqq, CLIENTID, self.psessionid, self._t()), D_REF)
        return {b.get("uin"): (b.get("status") or "online", CLIENT_TYPES.get(b.get("client_type"), "unknown"))
                for b in result or () if isinstance(b, dict)}

    def logout(self):
        skey, ptcz = self.http.cookie("skey") or "", self.http.cookie("ptcz") or ""
        try:
            self._call("GET", "https://ptlogin2.qq.com/logout?pt4_token=%s&pt4_hkey=%d&pt4_ptcz=%d&deep_logout=1"
                       % (self.http.cookie("pt4_token") or "", time33(skey), hash33(ptcz)),
                       referer="http://w.qq.com/", retries=1)
        except TransportError as e:
            self.log.debug("logout: %s", e)
        self._reset_session()

    def interrupt(self):
        self.poll_http.abort()

    def close(self):
        self.poll_http.close()
        self.http.close()
        if self.client.options["keep_cookie"] and self.psessionid:
            self.http.save_cookies(self.client.cookie_path)

    # -- contacts -------------------------------------------------------------

    def fetch_user(self):
        r = self._api("GET", "https://s.web2.qq.com/api/get_self_info2?t=%d" % self._t(), S_REF)
        b = r.get("birthday") or {}
        self.face = r.get("face")
        fields = {k: r.get(k) for k in ("account", "allow", "blood", "city", "college", "constel",
                                         "country", "email", "face", "homepage", "mobile",
                                         "occupation", "personal", "phone", "province", "shengxiao",
                                         "vip_info")}
        return User(id=r.get("uin"), uid=self.uid, name=r.get("nick"), signature=r.get("lnick"),
                    sex=r.get("gender"), state=self.client.options["mode"], client_type="web",
                    birthday="%s-%s-%s" % (b.get("year"), b.get("month"), b.get("day")) if b else None,
                    **fields)

    def fetch_friends(self):
        r = self._api("POST", "https://s.web2.qq.com/api/get_user_friends2", S_REF,
                      {"vfwebqq": self.vfwebqq, "hash": friend_hash(self.uid, self.ptwebqq)})
        categories = {c.get("index"): c.get("name") for c in r.get("categories") or ()}
        categories.setdefault(0, "我的好友")
        marknames = {m.get("uin"): m.get("markname") for m in r.get("marknames") or ()}
        vips = {v.get("u"): v for v in r.get("vipinfo") or ()}
        infos = {i.get("uin"): i for i in r.get("info") or ()}
        online = self._online_buddies()
        friends = []
        for f in r.get("friends") or ():
            uin = f.get("uin")
            info, vip = infos.get(uin, {}), vips.get(uin, {})
            state, client_type = online.get(uin, ("offline", "unknown"))
            friends.append(Friend(
                id=uin, name=info.get("nick"), face=info.get("face"), flag=f.get("flag", info.get("flag")),
                category=categories.get(f.get("categories"), "我的好友"), markname=marknames.get(uin),
                is_vip=vip.get("is_vip"), vip_level=vip.get("vip_level"), state=state,
                client_type=client_type))
        self._friend_numbers(friends)
        return friends

    def _friend_numbers(self, friends):
        """Fill friends' uid from qun.qq.com's friend list, matched on (displayname, category)."""
        try:
            result = self._qun("http://qun.qq.com/cgi-bin/qun_mgr/get_friend_list", {}, QUN_REF).get("result")
        except (UpstreamError, TransportError) as e:
            self.log.debug("no QQ numbers for friends: %s", e)
            return
        numbered = []
        for index, category in (result or {}).items():
            name = category.get("gname") or "我的好友"
            numbered.extend(((m.get("name"), name), m.get("uin")) for m in category.get("mems") or ())
        theirs = _unique_by(numbered, lambda pair: pair[0])
        ours = _unique_by(friends, lambda f: (f.displayname, f.category))
        for key, friend in ours.items():
            if key in theirs:
                friend.uid = theirs[key][1]

    def fetch_groups(self):
        r = self._api("POST", "https://s.web2.qq.com/api/get_group_name_list_mask2", S_REF,
                      {"vfwebqq": self.vfwebqq, "hash": friend_hash(self.uid, self.ptwebqq)})
        marks = {m.get("uin"): m.get("markname") for m in r.get("gmarklist") or ()}
        groups = [Group(id=g.get("gid"), code=g.get("code"), name=g.get("name"), remark=marks.get(g.get("gid")))
                  for g in r.get("gnamelist") or ()]
        try:
            lists = self._qun("http://qun.qq.com/cgi-bin/qun_mgr/get_group_list", {}, QUN_REF)
        except (UpstreamError, TransportError) as e:
            self.log.debug("no QQ numbers for groups: %s", e)
            return groups
        numbered = [(g, role) for key, role in (("create", "create"), ("manage", "manage"), ("join", "attend"))
                    for g in lists.get(key) or ()]
        theirs = _unique_by(numbered, lambda pair: pair[0].get("gn"))
        for name, group in _unique_by(groups, lambda g: g.name).items():
            if name in theirs:
                info, role = theirs[name]
                group.uid, group.owner_uid, group.role = info.get("gc"), info.get("owner"), role
        return groups

    def fetch_group_detail(self, group):
        r = self._api("GET", "https://s.web2.qq.com/api/get_group_info_ext2?gcode=%s&vfwebqq=%s&t=%d"
                      % (group.code, self.vfwebqq, self._t()), S_REF)
        ginfo = r.get("ginfo") or {}
        fields = {"name": ginfo.get("name"), "memo": ginfo.get("memo"), "createtime": ginfo.get("createtime"),
                  "level": ginfo.get("level"), "owner_id": ginfo.get("owner")}
        cut = self.client.options["group_member_card_cut_length"]
        cards = {c.get("muin"): c.get("card") for c in r.get("cards") or ()}
        stats = {s.get("uin"): s for s in r.get("stats") or ()}
        members = []
        for m in r.get("minfo") or ():
            uin, stat = m.get("uin"), stats.get(m.get("uin"))
            members.append(GroupMember(
                id=uin, name=m.get("nick"), sex=m.get("gender"), country=m.get("country"),
                province=m.get("province"), city=m.get("city"), card=cut_utf8(cards.get(uin), cut),
                state=STATE_CODES.get(stat.get("stat"), "online") if stat else "offline",
                client_type=CLIENT_TYPES.get(stat.get("client_type"), "unknown") if stat else "unknown"))
        if group.uid:
            self._member_numbers(group, members, cut)
        return fields, members

    def _member_numbers(self, group, members, cut):
        """Fill members' uid, role and times from qinfo, matched on (name, card)."""
        try:
            info = self._qun("http://qinfo.clt.qq.com/cgi-bin/qun_info/get_group_members",
                             {"gc": group.uid, "u": self.uid}, QINFO_REF)
        except (UpstreamError, TransportError) as e:
            self.log.debug("no QQ numbers for members of %s: %s", group.uid, e)
            return
        cards = {to_int(k): v for k, v in (info.get("cards") or {}).items()}
        joins = {to_int(k): v for k, v in (info.get("join") or {}).items()}
        spoke = {to_int(k): v for k, v in (info.get("times") or {}).items()}
        admins, owner = set(info.get("adm") or ()), info.get("owner")
        theirs = _unique_by(info.get("mems") or (), lambda m: (m.get("n"), cut_utf8(cards.get(m.get("u")), cut)))
        for key, member in _unique_by(members, lambda m: (m.name, m.card)).items():
            if key in theirs:
                qq = theirs[key].get("u")
                member.uid, member.join_time, member.last_speak_time = qq, joins.get(qq), spoke.get(qq)
                member.role = "owner" if qq == owner else "admin" if qq in admins else "member"

    def fetch_discusses(self):
        r = self._api("GET", "https://s.web2.qq.com/api/get_discus_list?clientid=%d&psessionid=%s&vfwebqq=%s&t=%d"
                      % (CLIENTID, self.psessionid, self.vfwebqq, self._t()), S_REF)
        discusses = []
        for d in r.get("dnamelist") or ():
            info = self._api("GET", "http://d1.web2.qq.com/channel/get_discu_info?did=%s&vfwebqq=%s&clientid=%d"
                             "&psessionid=%s&t=%d" % (d.get("did"), self.vfwebqq, CLIENTID, self.psessionid,
                                                      self._t()), D_REF)
            names = {m.get("uin"): m.get("nick") for m in info.get("mem_info") or ()}
            stats = {s.get("uin"): s for s in info.get("mem_status") or ()}
            members = []
            for m in (info.get("info") or {}).get("mem_list") or ():
                uin, stat = m.get("mem_uin"), stats.get(m.get("mem_uin")) or {}
                members.append(DiscussMember(
                    id=str(uin), uid=m.get("ruin"), name=names.get(uin), state=stat.get("status") or "offline",
                    client_type=CLIENT_TYPES.get(stat.get("client_type"), "unknown")))
            discusses.append(Discuss(id=d.get("did"), name=d.get("name"),
                                     owner_id=(info.get("info") or {}).get("discu_owner"), members=members))
        return discusses

    # -- receiving ------------------------------------------------------------

    def poll(self):
        r = {"ptwebqq": self.ptwebqq, "clientid": CLIENTID, "psessionid": self.psessionid, "key": ""}
        res = self.poll_http.post("http://d1.web2.qq.com/channel/poll2",
                                  data={"r": json.dumps(r)}, referer=D_REF)
        if res.status in (502, 504, 404):
            return []
        if res.status != 200:
            return self._poll_failure("HTTP %s" % res.status)
        try:
            body = res.json()
            retcode = body.get("retcode")
        except (ValueError, AttributeError):
            return self._poll_failure("not JSON")
        if retcode == 0:
            self.poll_failures = 0
            return self._parse_poll(body.get("result") or [])
        if retcode == 116:
            self.ptwebqq = body.get("p") or self.ptwebqq
            self.http.set_cookie("ptwebqq", self.ptwebqq)
            return []
        if retcode in POLL_IGNORED:
            return []
        if retcode in POLL_RELINK:
            self._relink()
            return []
        if retcode in POLL_RELOGIN:
            if self._probe():
                return []
            raise NeedRelogin("接收消息返回 retcode %s，会话已失效 (session lost)" % retcode)
        return self._poll_failure("retcode %s" % retcode)

    def _poll_failure(self, why):
        self.poll_failures += 1
        self.log.warning("接收消息失败 (%s)，连续%d次", why, self.poll_failures)
        if self.poll_failures > self.client.options["poll_failure_count_max"]:
            self.poll_failures = 0
            raise NeedRelogin("接收消息失败次数超过最大值 (too many poll failures)")
        return []

    def _probe(self):
        """True when the session still answers get_online_buddies2."""
        try:
            self._online_buddies()
            return True
        except (UpstreamError, TransportError):
            return False

    def _relink(self):
        """Answer to poll 120/121: login2 again with the current psessionid."""
        try:
            result = self._api("POST", "http://d1.web2.qq.com/channel/login2", D_REF, {
                "status": self.client.options["mode"], "key": "", "ptwebqq": self.ptwebqq,
                "clientid": CLIENTID, "psessionid": self.psessionid}, retries=1)
        except (UpstreamError, TransportError) as e:
            raise NeedRelogin("重新连接失败 (relink failed: %s)" % e)
        self.psessionid = result.get("psessionid") or self.psessionid
        self.vfwebqq = result.get("vfwebqq") or self.vfwebqq
        self.ptwebqq = result.get("ptwebqq") or self.ptwebqq
        self.log.info("已重新连接 (relinked)")

    def _parse_poll(self, result):
        items = []
        for event in result:
            kind, v = event.get("poll_type"), event.get("value") or {}
            base = {"kind": "message", "id": v.get("msg_id"), "time": to_int(v.get("time"), int(time.time())),
                    "sender_id": v.get("send_uin", v.get("from_uin")), "receiver_id": v.get("to_uin"),
                    "raw_content": v.get("content"), "content": flatten_content(v.get("content"))}
            if kind == "message":
                base.update(type="friend_message", sender_id=v.get("from_uin"))
            elif kind == "group_message":
                content = v.get("content") or []
                if len(content) > 1 and content[1] == GARBAGE_FONT:
                    continue
                base.update(type="group_message", group_id=v.get("from_uin"))
            elif kind == "discu_message":
                base.update(type="discuss_message", discuss_id=v.get("did", v.get("from_uin")))
            elif kind == "sess_message":
                via = {0: "group", 1: "discuss"}.get(v.get("service_type"))
                if via is None:
                    continue
                base.update(type="sess_message", via=via, sender_id=v.get("from_uin"), sender_uid=v.get("ruin"))
                base["group_id" if via == "group" else "discuss_id"] = v.get("id")
            elif kind == "group_web_message":
                found = self.SHARED_FILE.search(v.get("xml") or "")
                if not found:
                    continue
                base.update(type="group_message", group_id=v.get("from_uin"), content="共享文件 [%s]" % found.group(1))
            elif kind == "buddies_status_change":
                items.append({"kind": "state", "id": v.get("uin"), "state": v.get("status") or "offline",
                              "client_type": CLIENT_TYPES.get(v.get("client_type"), "unknown")})
                continue
            elif kind == "kick_message":
                reason = v.get("reason") if v.get("show_reason") != 0 else None
                items.append({"kind": "kick", "reason": reason or "您已被迫下线"})
                continue
            else:
                self.log.debug("ignored poll event %s", kind)
                continue
            items.append(base)
        return items

    # -- sending and group admin ----------------------------------------------

    ENDPOINTS = {"friend_message": "send_buddy_msg2", "group_message": "send_qun_msg2",
                 "discuss_message": "send_discu_msg2", "sess_message": "send_sess_msg2"}

    def send(self, msg):
        r = {"content": json.dumps(encode_content(msg.content), ensure_ascii=False),
             "face": self.face if self.face is not None else (570 if msg.type == "friend_message" else 591),
             "clientid": CLIENTID, "msg_id": msg.id, "psessionid": self.psessionid}
        if msg.type == "friend_message":
            r["to"] = msg.receiver.id
        elif msg.type == "group_message":
            r["group_uin"] = msg.group.id
        elif msg.type == "discuss_message":
            r["did"] = msg.discuss.id
        else:
            service_type = 0 if msg.via == "group" else 1
            sig = self._sess_sig(msg.place.id, to_int(msg.receiver.id), service_type)
            if not sig:
                return -5, "无法获取到sess_sig"
            r.update(to=to_int(msg.receiver.id), group_sig=sig, service_type=service_type)
        try:
            res = self.http.post("http://d1.web2.qq.com/channel/" + self.ENDPOINTS[msg.type],
                                 data={"r": json.dumps(r, ensure_ascii=False)}, referer=D_REF)
            return send_status(res.json())
        except TransportError as e:
            if e.timed_out:  # the server took the message and went silent: sending it again may duplicate it
                return final_status(msg, -1, "发送超时，消息可能已发出 (no answer in time; it may have been sent)")
            return -1, "数据格式错误"
        except ValueError:
            return -1, "数据格式错误"

    def _sess_sig(self, id, to, service_type):
        """The temporary-session signature for (id, to), cached 300 s."""
        key, now = (id, to, service_type), time.time()
        cached = self._sess_sigs.get(key)
        if cached and cached[1] > now:
            return cached[0]
        try:
            result = self._api("GET", "http://d1.web2.qq.com/channel/get_c2cmsg_sig2?id=%s&to_uin=%s"
                               "&service_type=%d&clientid=%d&psessionid=%s&t=%d"
                               % (id, to, service_type, CLIENTID, self.psessionid, self._t()), D_REF, retries=1)
        except (UpstreamError, TransportError) as e:
            self.log.warning("无法获取到sess_sig: %s", e)
            return None
        sig = result.get("value") if isinstance(result, dict) else None
        if sig:
            self._sess_sigs[key] = (sig, now + 300)
        return sig

    def shutup(self, group, members, seconds):
        if not group.uid or seconds < 60 or group.role == "attend" or any(
                m.uid is None or m.role in ("owner", "admin") for m in members):
            return False
        shutup_list = json.dumps([{"uin": m.uid, "t": int(seconds)} for m in members])
        try:
            self._qun("http://qinfo.clt.qq.com/cgi-bin/qun_info/set_group_shutup",
                      {"gc": group.uid, "shutup_list": shutup_list}, QINFO3_REF)
            return True
        except (UpstreamError, TransportError) as e:
            self.log.warning("禁言失败 (shutup failed): %s", e)
            return False

    def kick(self, group, members):
        if not group.uid or group.role == "attend" or any(m.uid is None for m in members):
            return False
        try:
            self._qun("http://qun.qq.com/cgi-bin/qun_mgr/delete_group_member",
                      {"gc": group.uid, "ul": "|".join(str(m.uid) for m in members), "flag": 0}, QUN_REF)
            return True
        except (UpstreamError, TransportError) as e:
            self.log.warning("踢人失败 (kick failed): %s", e)
            return False

###############################################################################
# 8. Client
###############################################################################

HERE = os.path.dirname(os.path.abspath(__file__))
# The packages plugins and simulators are imported from. pip installs them beside webqq.py; a checkout
# has them as the folders plugins/ and scripts/, imported under these same names (map_checkout_folders).
PACKAGES = {"webqq_plugins": "plugins", "webqq_scripts": "scripts"}


def map_checkout_folders():
    """In a checkout, make plugins/ importable as webqq_plugins and scripts/ as webqq_scripts, so that
    every layout imports each module once, under one name."""
    for package, folder in PACKAGES.items():
        init = os.path.join(HERE, folder, "__init__.py")
        if package in sys.modules or os.path.isdir(os.path.join(HERE, package)) or not os.path.isfile(init):
            continue
        spec = importlib.util.spec_from_file_location(package, init,
                                                      submodule_search_locations=[os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)


class NoPlugin(ImportError):
    """There is no plugin of that name; hint names the closest one, or every one there is."""

    def __init__(self, name):
        names = plugin_names()
        close = closest(name, names)
        self.hint = "did you mean [%s]?" % close if close else "the plugins: %s" % ", ".join(names)
        ImportError.__init__(self, "no plugin called %r (%s)" % (name, self.hint))


def plugin_module(name):
    """The module of the plugin called name (in webqq_plugins), or of a dotted module path; NoPlugin
    when there is no such module (an import error inside the plugin is raised as it is)."""
    path = name if "." in name else "webqq_plugins." + name.lower()
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name != path and not path.startswith(str(e.name) + "."):
            raise
        raise NoPlugin(name) from None


def plugin_names():
    """The plugins webqq has: the modules of webqq_plugins with a call()."""
    import pkgutil
    package = importlib.import_module("webqq_plugins")
    names = [info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_")]
    return sorted(name for name in names if hasattr(importlib.import_module("webqq_plugins." + name), "call"))


def check_upstream(value):
    """A check: smartqq, or a plugin that provides an upstream (onebot, or a dotted module path)."""
    text = str(value).strip()
    if text.lower() == "smartqq":
        return "smartqq"
    try:
        plugin_module(text)
    except NoPlugin:
        raise ValueError("must be smartqq or a plugin that provides an upstream (onebot), not %r%s"
                         % (value, did_you_mean(text, ["smartqq"] + plugin_names())))
    return text


class Client(EventEmitter):
    """The QQ client: options, the state machine, files, the send queue, relogin, plugins."""

    # option: (default, one line of help). The README's option table is this.
    OPTIONS = collections.OrderedDict([
        ("account", ("default", "instance name, used in file names")),
        ("tmpdir", (None, "folder for the cookie, pid, QR and state files (default: the system temp folder)")),
        ("upstream", ("smartqq", "backend: smartqq, or a plugin providing one (onebot)", check_upstream)),
        ("upstream_options", ({}, "options for an upstream plugin")),
        ("smartqq_base", (None, "send every *.qq.com request to this base URL (a simulator)", check_url)),
        ("mode", ("online", "presence: online away busy silent hidden offline callme", one_of(*MODES))),
        ("send_interval", (3.0, "seconds between two sends")),
        ("msg_ttl", (3, "attempts per message")),
        ("update_interval", (600.0, "seconds between contact refreshes")),
        ("load_members", (True, "load every group's members in the background after login")),
        ("qrcode_count_max", (10, "stop after this many expired QR codes")),
        ("qr_check_interval", (3.0, "seconds between two checks of the QR state")),
        ("qrcode_display", ("terminal", "where to show the QR: terminal, file, viewer, console, email, none "
                                         "(comma-separated)", check_qr_modes)),
        ("poll_failure_count_max", (3, "relogin after more unknown poll errors in a row than this")),
        ("send_failure_count_max", (5, "relogin after this many send errors (-3) in a row")),
        ("poll_timeout", (120.0, "seconds to wait for one long poll")),
        ("http_timeout", (30.0, "seconds to wait for any other upstream request")),
        ("keep_cookie", (True, "keep cookies in a file to log in again without a scan")),
        ("check_account", (False, "stop when the scanning account differs from a numeric `account`")),
        ("ignore_unknown_id", (True, "drop messages from senders not in the contacts")),
        ("allow_message_sync", (False, "report own messages sent from other devices")),
        ("default_send_real_comp_sign", (False, "send < and > as they are (else as ＜ ＞)")),
        ("group_member_card_cut_length", (21, "cut group cards to this many UTF-8 bytes")),
        ("group_member_use_friend_markname", (True, "show a member by the friend's markname")),
        ("relogin_at", (None, "log in again every day at this local time, HH:MM (e.g. 04:30)")),
        ("controller_pid", (None, "stop when the process with this pid (a controller) is gone")),
        ("controller_pid_path", (None, "stop when the process whose pid is in this file (a controller) is gone")),
        ("controller_grace", (10.0, "seconds the controller may be gone (restarting) before the client stops")),
        ("log_level", ("info", "debug info msg warn error fatal", check_log_level)),
        ("log_path", (None, "log file (default: standard error)")),
        ("cookie_path", (None, "cookie file (default: tmpdir/mojo_webqq_cookie_<account>.dat)")),
        ("qrcode_path", (None, "QR file (default: tmpdir/mojo_webqq_qrcode_<account>.png)")),
        ("pid_path", (None, "pid file (default: tmpdir/mojo_webqq_pid_<account>.pid)")),
        ("state_path", (None, "state file (default: tmpdir/mojo_webqq_state_<account>.json)")),
    ])

    def __init__(self, **options):
        self.options = opts = dict(read_options("webqq", self.OPTIONS, options))
        log = logging.getLogger("webqq")
        if opts["log_path"] or not any(getattr(h, "webqq", False) for h in log.handlers):
            # a client of a controller shares its log: each line says which client it comes from
            label = opts["account"] if opts["controller_pid"] or opts["controller_pid_path"] else None
            configure_logging(opts["log_level"], opts["log_path"], label=label)
        else:  # the process's log destination stays; the level is this client's
            log.setLevel(LOG_LEVELS.get(str(opts["log_level"]).lower(), logging.INFO))
        EventEmitter.__init__(self, log)
        if requests is None:
            log.warning("requests 未安装，使用 urllib (requests is not installed: webqq uses urllib instead)")
        self.account = str(opts["account"])
        self.tmpdir = opts["tmpdir"] or tempfile.gettempdir()
        if not os.path.isdir(self.tmpdir):
            os.makedirs(self.tmpdir, 0o700)
        elif opts["tmpdir"] and os.name != "nt" and os.stat(self.tmpdir).st_mode & 0o022:
            self.log.warning("tmpdir %s is writable by other users: keep the cookie, QR and state files in a "
                             "private folder (mode 0700)", self.tmpdir)
        for kind, ext in (("cookie", "dat"), ("qrcode", "png"), ("pid", "pid"), ("state", "json")):
            path = opts[kind + "_path"] or os.path.join(self.tmpdir, "mojo_webqq_%s_%s.%s" % (kind, self.account, ext))
            setattr(self, kind + "_path", path)
        self.send_interval = float(opts["send_interval"])
        self.msg_ttl = int(opts["msg_ttl"])
        self._relogin_at = parse_clock(opts["relogin_at"]) if opts["relogin_at"] else None
        self.version, self.pid, self.starttime = __version__, os.getpid(), int(time.time())
        self.state, self.previous_state = "init", None
        self.contacts = Contacts(opts["group_member_use_friend_markname"])
        self.upstream = None
        self.qrcode = None
        self.exit_status = 0
        self.load_error = None  # the exception of the last load() that failed
        self.send_failure_count = 0
        self._cond = threading.Condition()  # guards state, _session, the start of stop() and the send queue
        self._send_queue = collections.deque()
        self._session = 0  # increases with every login: work of an older session is dropped
        self._members_stale = False  # the member lists loaded are to be fetched again (after a relogin)
        self._started = False
        self._stop_event, self._stopped = threading.Event(), threading.Event()   # stop() began, ended
        self._stopper = None  # the thread that called stop() first
        self._own_pid_file = False
        self._relogin_event = threading.Event()
        self._incoming = queue.Queue()
        self._threads = []
        self.plugins = []  # (name, plugin) in load order
        self._refresh_lock = threading.RLock()
        self._refreshed = {}
        self._msg_id_lock = threading.Lock()
        self._msg_id = (int(time.time()) % 10000) * 10000

    @property
    def stopping(self):
        return self._stop_event.is_set()

    @property
    def user(self):
        return self.contacts.user

    # -- lifecycle ------------------------------------------------------------

    def set_upstream(self, upstream):
        """Use this Upstream instance (before start())."""
        self.upstream = upstream

    def load(self, name, **options):
        """Import the plugin called name (or a dotted module path) and call its call(client, **options)
        with every option of its OPTIONS table: those given, checked, and the defaults of the others.

        Returns the plugin: what call() returned, or the module when that is None; None when
        loading failed, an unknown option or a refused value included (logged; the client carries
        on without it).
        """
        try:
            module = plugin_module(name)
            table = getattr(module, "OPTIONS", {})
            if isinstance(options.get("data"), dict) and "data" not in table:  # the Perl form: data => {...}
                options = dict(options.pop("data"), **options)
            options = read_options(module.__name__.rpartition(".")[2], table, options)
            plugin = module.call(self, **options)
        except BindError as e:      # says all there is to say
            self.load_error = e
            self.log.error("%s", e)
            return None
        except (ImportError, OSError, ValueError, TypeError) as e:
            self.load_error = e
            self.log.error("插件[%s]加载失败 (plugin failed to load): %s", name, e)
            return None
        except Exception as e:
            self.load_error = e
            self.log.exception("插件[%s]加载失败 (plugin failed to load)", name)
            return None
        plugin = module if plugin is None else plugin
        self.plugins.append((name, plugin))
        self.log.debug("插件[%s]已加载", name)
        return plugin

    def plugin(self, name):
        """The plugin last loaded under name, or None."""
        for loaded, plugin in reversed(self.plugins):
            if loaded == name:
                return plugin
        return None

    def start(self):
        """Begin: check the pid file, then log in on a thread of its own; returns at once."""
        if self._started:
            return
        self._started = True
        if self.upstream is None:
            if self.options["upstream"] == "smartqq":
                self.upstream = SmartQQ(self)
            else:
                plugin = self.load(self.options["upstream"], **(self.options["upstream_options"] or {}))
                if self.upstream is None:
                    if plugin is not None:      # a load that failed has told why
                        self.log.error("upstream %s is not available", self.options["upstream"])
                    self.stop_after_failed_load()
                    return
        start_qr_displays(self)
        if not self._claim_pid_file():
            self.stop(status=1)
            return
        self._save_state()
        self._spawn("webqq-main", self._main)
        if self._relogin_at is not None:
            self._spawn("webqq-relogin-timer", self._relogin_daily)
        if self.options["controller_pid"] or self.options["controller_pid_path"]:
            self._spawn("webqq-watchdog", self._watch_controller)

    def run(self):
        """start(), then block until the client stops; the exit status."""
        self.start()
        try:
            while not self.join(0.5):
                pass
        except KeyboardInterrupt:
            self.stop(reason="interrupted")
        return self.exit_status

    def stop(self, reason=None, status=0):
        """Stop everything; returns when every thread of the client and its plugins has ended."""
        with self._cond:
            already = self._stop_event.is_set()
            if not already:
                self._stop_event.set()
                self.exit_status = status
                self._stopper = threading.current_thread()
            self._cond.notify_all()
        if already:
            if threading.current_thread() is not self._stopper:
                self._stopped.wait()
            return
        if reason:
            (self.log.error if status else self.log.info)("%s", reason)
        self._relogin_event.set()
        self._incoming.put(None)
        if self.upstream is not None:
            self.upstream.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(15)
                if thread.is_alive():
                    self.log.error("thread %s did not stop", thread.name)
        with self._cond:
            pending, self._send_queue = list(self._send_queue), collections.deque()
        for msg in pending:
            self._finish_send(msg, -5, "客户端停止运行")
        self.set_state("stop")
        self.emit("stop")
        for name, plugin in reversed(self.plugins):
            if hasattr(plugin, "stop"):
                try:
                    plugin.stop()
                except Exception:
                    self.log.exception("插件[%s]停止失败", name)
        remove_file(self.qrcode_path)
        if self._own_pid_file:
            remove_file(self.pid_path)
        self.log.info("客户端停止运行 (client stopped)")
        self._stopped.set()

    def stop_after_failed_load(self):
        """stop() because a plugin needed did not load: exit status 2 when it could not listen on its
        address (a setting to change, as for a config error), else 1."""
        self.stop(status=2 if isinstance(self.load_error, BindError) else 1)

    def join(self, timeout=None):
        """Wait until the client has stopped completely; True if it has."""
        return self._stopped.wait(timeout)

    def relogin(self):
        """Ask for a new login (the session is gone); returns at once."""
        with self._cond:
            if self.state != "running" or self.stopping:
                return False
        self.set_state("updating")
        self._relogin_event.set()
        return True

    def sleep(self, seconds):
        """Wait seconds; False when the client began stopping meanwhile."""
        return not self._stop_event.wait(seconds)

    def _wait_running(self):
        """Block until the client runs (True) or begins stopping (False): a stop during a relogin,
        whose states are neither running nor stop, ends the wait too."""
        with self._cond:
            self._cond.wait_for(lambda: self.state == "running" or self.stopping)
            return not self.stopping

    def wait_for_state(self, *states, **kwargs):
        """Block until the state is one of states (timeout= seconds); True if it is."""
        with self._cond:
            return self._cond.wait_for(lambda: self.state in states, kwargs.get("timeout"))

    def set_state(self, new):
        """Move to state new, rewrite the state file and emit state_change."""
        if new not in STATES:
            raise ValueError("unknown state %r" % new)
        with self._cond:
            old = self.state
            if old == new or old == "stop":
                return
            self.previous_state, self.state = old, new
            self._save_state()
            self._cond.notify_all()
        self.emit("state_change", old, new)

    def show_qrcode(self, png):
        """A new QR code to scan: write it to qrcode_path and emit input_qrcode."""
        self.qrcode = png
        save_file(self.qrcode_path, png, self.log, ("二维码文件", "QR"))   # e.g. another user's file there
        self.log.info("请使用手机QQ扫描二维码 (scan the QR code with the QQ app): %s", self.qrcode_path)
        self.emit("input_qrcode", self.qrcode_path, png)

    def client_info(self):
        """What get_client_info reports."""
        return {"account": self.account, "pid": self.pid, "starttime": self.starttime,
                "runtime": int(time.time() - self.starttime), "os": PERL_OS.get(sys.platform, sys.platform),
                "version": self.version, "log_level": self.options["log_level"],
                "log_path": self.options["log_path"] or "", "log_encoding": None, "http_debug": 0}

    def thread(self, name, target, *args):
        """A daemon thread for the client or a plugin, not started yet: an exception that ends it is
        logged and stops the client (exit status 1), so that no part of it dies silently."""
        return Thread(name, target, args, self.log, self._thread_died)

    def _thread_died(self, name):
        if self.stopping:       # it died while the client stops: stop() is waiting for it
            return
        self.stop(reason="线程%s意外终止，客户端停止运行 (thread %s died: see the error above)" % (name, name),
                  status=1)

    def _spawn(self, name, target):
        thread = self.thread(name, target)
        self._threads.append(thread)
        thread.start()
        return thread

    def _relogin_daily(self):
        hour, minute = self._relogin_at
        due = next_clock_time(datetime.datetime.now(), hour, minute)
        while self.sleep(min(60.0, max(0.0, (due - datetime.datetime.now()).total_seconds()))):
            if datetime.datetime.now() >= due:
                self.log.info("每日定时重新登录 (daily relogin at %02d:%02d)", hour, minute)
                self.relogin()
                due = next_clock_time(datetime.datetime.now(), hour, minute)

    def _controller_alive(self):
        path = self.options["controller_pid_path"]
        return pid_alive(read_pid(path) if path else to_int(self.options["controller_pid"], 0))

    def _watch_controller(self):
        # A controller that restarts rewrites its pid file; its children wait for it that long.
        grace, gone_since = float(self.options["controller_grace"]), None
        while self.sleep(1.0):
            if self._controller_alive():
                gone_since = None
                continue
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since >= grace:
                self.stop(reason="控制器已退出，客户端停止运行 (the controller is gone)")
                break

    # -- files ----------------------------------------------------------------

    def _claim_pid_file(self):
        other = read_pid(self.pid_path)
        if other and other != self.pid and pid_alive(other):
            self.log.error("检测到该账号有其他运行中的客户端(pid:%s), 请先将其关闭 "
                           "(another client of account %s is running)", other, self.account)
            return False
        atomic_write(self.pid_path, str(self.pid), 0o644)
        self._own_pid_file = True
        return True

    def _save_state(self):
        opts = self.options
        state = {
            "account": self.account, "version": self.version, "start_time": self.starttime,
            "mode": opts["mode"], "http_debug": 0, "log_encoding": None, "log_path": opts["log_path"],
            "log_level": opts["log_level"], "log_console": 1, "disable_color": 1, "tmpdir": self.tmpdir,
            "cookie_path": self.cookie_path, "qrcode_path": self.qrcode_path, "pid_path": self.pid_path,
            "state_path": self.state_path, "keep_cookie": int(bool(opts["keep_cookie"])),
            "ua_retry_times": 3, "qrcode_count_max": opts["qrcode_count_max"], "state": self.state,
            "previous_state": self.previous_state, "pid": self.pid,
            "os": PERL_OS.get(sys.platform, sys.platform), "upstream": opts["upstream"],
            "plugin": [{"name": name, "priority": 0, "auto_call": 1, "call_on_load": 1}
                       for name, _ in self.plugins]}
        save_file(self.state_path, json_dumps(state), self.log, ("状态文件", "state"), logging.WARNING)

    # -- login ----------------------------------------------------------------

    def _main(self):
        try:
            self.set_state("loading")
            self._login()
            for name, target in (("webqq-poll", self._poll_loop), ("webqq-dispatch", self._dispatch_loop),
                                 ("webqq-send", self._send_loop), ("webqq-update", self._update_loop)):
                self._spawn(name, target)
            self._go_online()
            while True:
                self._relogin_event.wait()
                if self.stopping:
                    break
                self._relogin_event.clear()
                self._relogin()
        except Stopped:
            pass
        except LoginFailed as e:
            self.stop(reason="登录失败，客户端退出: %s" % e, status=1)
        except Exception:
            self.log.exception("unexpected error")
            self.stop(reason="客户端异常退出 (unexpected error)", status=1)

    def _login(self, diff=False):
        """Log in (retrying what can be retried), load the contacts (diff: reporting what changed), emit login."""
        failures = 0
        while True:
            if self.stopping:
                raise Stopped()
            try:
                is_scan = self.upstream.login()
                self._load_contacts(diff)
                break
            except (LoginFailed, TransportError, UpstreamError) as e:
                if getattr(e, "fatal", False):
                    raise
                failures += 1
                delay = min(60, 2 ** failures)
                self.log.warning("%s; 将在%d秒后重试 (retrying in %d s)", e, delay, delay)
                if not self.sleep(delay):
                    raise Stopped()
        self.qrcode = None
        remove_file(self.qrcode_path)
        self.log.info("帐号(%s)登录成功 (logged in)", self.upstream.uid)
        self.emit("login", 1 if is_scan else 0)

    def _load_contacts(self, diff=False):
        self.set_state("updating")
        if not self._load_user(diff=diff):
            self.contacts.set_user(User(id=self.upstream.uid, uid=self.upstream.uid), diff=False)
        ok = []
        for kind, listed in (("friend", self.contacts.friends), ("group", self.contacts.groups),
                             ("discuss", self.contacts.discusses)):
            ok.append(self._refresh(kind, diff=diff))
            count = len(listed())
            self.emit("progress", kind, count, count)
        if not (ok[0] or ok[1]):
            raise LoginFailed("好友和群组信息都无法获取 (no contacts)", fatal=False)

    def _go_online(self):
        with self._cond:
            self._session += 1
        self.set_state("running")
        self.log.info("开始接收消息... (running)")

    def _relogin(self):
        self.log.warning("正在重新登录... (logging in again)")
        self.upstream.interrupt()
        self.upstream.logout()
        compare = self.upstream.stable_ids
        if not compare:
            self.contacts.clear()
        self.send_failure_count = 0
        try:
            self._login(diff=compare)
        except LoginFailed as e:
            self.stop(reason="重新登录失败，客户端退出: %s" % e, status=1)
            raise Stopped()
        self.emit("relogin")
        with self._cond:
            self._members_stale = compare     # the member lists kept are compared again too
        self._go_online()

    # -- contacts -------------------------------------------------------------

    def _load_user(self, diff=True):
        """Fetch the account's own info and store it; True if it worked."""
        try:
            events = self.contacts.set_user(self.upstream.fetch_user(), diff=diff)
        except (UpstreamError, TransportError) as e:
            self._update_failed("个人信息", e)
            return False
        for name, args in events:
            self.emit(name, *args)
        return True

    def _refresh(self, kind, diff=True):
        """Fetch one kind of contact list (friend, group, discuss) and store it; True if it worked."""
        fetch = {"friend": self.upstream.fetch_friends, "group": self.upstream.fetch_groups,
                 "discuss": self.upstream.fetch_discusses}[kind]
        store = {"friend": self.contacts.set_friends, "group": self.contacts.set_groups,
                 "discuss": self.contacts.set_discusses}[kind]
        with self._refresh_lock:
            try:
                events = store(fetch(), diff=diff)
            except (UpstreamError, TransportError) as e:
                self._update_failed("%s信息" % kind, e)
                self.emit("model_update", kind, 0)
                return False
            self._refreshed[kind] = time.time()  # after a failure, the next unknown sender retries
        self._announce(events)
        self.emit("model_update", kind, 1)
        return True

    def _announce(self, events):
        """Emit contact events; a new group's members are loaded first (its report lists them)."""
        for name, args in events:
            if name == "new_group":
                self.ensure_members(args[0])
            self.emit(name, *args)

    def _update_failed(self, what, error):
        """Log a failed contact update: a warning, or only a debug line once the client is stopping."""
        (self.log.debug if self.stopping else self.log.warning)("更新%s失败 (update failed): %s", what, error)

    def _refresh_stale(self, kind, seconds=30):
        """_refresh(kind) unless that was done in the last seconds."""
        if time.time() - self._refreshed.get(kind, 0) >= seconds:
            self._refresh(kind)

    def load_members(self, group):
        """Fetch a group's detail and members (events once they were loaded before); True if it worked."""
        with self._refresh_lock:
            try:
                fields, members = self.upstream.fetch_group_detail(group)
            except (UpstreamError, TransportError) as e:
                self._update_failed("群[%s]成员" % group.name, e)
                return False
            events = self.contacts.set_group_members(group, fields, members)
        for name, args in events:
            self.emit(name, *args)
        return True

    def ensure_members(self, group):
        """Make sure a group's members are loaded (fetching them now if not)."""
        if group.members_loaded:        # no waiting behind a refresh that holds the lock
            return True
        with self._refresh_lock:
            if not group.members_loaded:
                self.load_members(group)
        return group.members_loaded

    def _update_loop(self):
        while self._wait_running():
            try:
                self._update()
            except Exception:       # a malformed answer: this round is lost, the next one comes
                self.log.exception("联系人更新出错 (contact update failed)")
                self.sleep(float(self.options["update_interval"]))

    def _update(self):
        """One round of webqq-update: reload stale member lists, load the members not loaded yet, wait
        update_interval, refresh."""
        interval = float(self.options["update_interval"])
        with self._cond:
            session, stale, self._members_stale = self._session, self._members_stale, False
        if stale:
            self._reload_members(session)
        if self.options["load_members"]:
            pending = [group for group in self.contacts.groups() if not group.members_loaded]
            for done, group in enumerate(pending, 1):
                if not self._current(session):
                    break
                self.ensure_members(group)
                self.emit("progress", "member", done, len(pending))
        deadline = time.time() + interval
        with self._cond:
            self._cond.wait_for(lambda: not self._current(session) or time.time() >= deadline,
                                max(0.0, deadline - time.time()))
        if not self._current(session):
            return
        ok = [self._refresh(kind) for kind in ("friend", "group", "discuss")]
        if self.contacts.user.name is None:  # get_self_info2 failed at login
            self._load_user()
        self._reload_members(session)
        if not (ok[0] or ok[1]):
            self.relogin()

    def _reload_members(self, session):
        """Fetch again the member lists loaded before, reporting what changed, while session runs."""
        for group in self.contacts.groups():
            if self._current(session) and group.members_loaded:
                self.load_members(group)

    def _current(self, session):
        """True while the client runs the login it ran when session was read."""
        return self.state == "running" and self._session == session and not self.stopping

    # -- receiving ------------------------------------------------------------

    def _poll_loop(self):
        failures = 0
        while self._wait_running():
            with self._cond:
                session = self._session
            started = time.time()
            try:
                items = self.upstream.poll()
                failures = 0
            except NeedRelogin as e:
                if self._current(session):
                    self.log.warning("%s", e)
                    self.relogin()
                continue
            except Stopped:
                break
            except TransportError as e:
                if self.stopping:
                    break
                failures += 1
                if self._current(session):
                    self.log.debug("poll: %s", e)
                self.sleep(min(30, 0.5 * 2 ** min(failures, 6)))
                continue
            except Exception:
                self.log.exception("poll failed")
                self.sleep(1)
                continue
            if not self._current(session):
                continue
            for item in items:
                self._incoming.put(item)
            if items:
                self._wait_dispatched()
            elif time.time() - started < 0.5:
                self.sleep(0.5)

    def _wait_dispatched(self):
        """Wait until the dispatch thread has handled what is queued (the plugins have kept it): only then
        does the next poll tell an upstream that takes it as an acknowledgement that it was read."""
        done = threading.Event()
        self._incoming.put(done)
        while not done.wait(0.2) and not self.stopping:
            pass

    def _dispatch_loop(self):
        while True:
            item = self._incoming.get()
            if item is None:
                break
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._dispatch(item)
            except Exception:
                self.log.exception("dispatch of %s failed", item.get("kind"))

    def _dispatch(self, item):
        kind = item["kind"]
        if kind == "state":
            friend = self.contacts.friend(item["id"])
            if friend is not None:
                old = friend.state
                self.contacts.set_friend_state(item["id"], item["state"], item.get("client_type"))
                self.emit("friend_state_change", friend)
                if old != friend.state:
                    self.emit("friend_property_change", friend, "state", old, friend.state)
        elif kind == "apply":
            self._announce(item["fn"]() or ())
        elif kind == "kick":
            self.stop(reason="%s，客户端停止运行 (logged out by the server)" % item["reason"], status=1)
        elif kind == "message":
            msg = self._resolve(item)
            if msg is not None:
                self.emit("send_message" if msg.cls == "send" else "receive_message", msg)

    def _resolve(self, item):
        """A received message with its sender, receiver, group or discuss; None to drop it."""
        c, t, sender_id = self.contacts, item["type"], item.get("sender_id")
        msg = Message(id=item.get("id"), type=t, cls="recv", time=item.get("time"),
                      content=item.get("content"), raw_content=item.get("raw_content"), receiver=c.user)
        if t == "friend_message":
            msg.sender = self._find(c.friend, sender_id, "friend") or Friend(
                id=sender_id, name="昵称未知", category="陌生人", placeholder=True)
            if sender_id == c.user.id:
                msg.receiver = c.friend(item.get("receiver_id"))
        elif t in ("group_message", "discuss_message") or item.get("via"):
            in_group = t == "group_message" or item.get("via") == "group"
            container = self._find(c.group if in_group else c.discuss,
                                   item.get("group_id" if in_group else "discuss_id"),
                                   "group" if in_group else "discuss")
            if container is None:
                self.log.debug("dropped a message from an unknown %s", "group" if in_group else "discuss")
                return None
            if in_group:
                msg.group = container
                self.ensure_members(container)
            else:
                msg.discuss = container
            if item.get("anonymous") is not None:     # no member: shown by the name the upstream gives
                msg.sender = GroupMember(id=sender_id, name=item["anonymous"], group=container)
            else:
                msg.sender = self._find_member(container, sender_id, in_group, item.get("sender_uid"))
            msg.via = item.get("via")
            msg.receiver = self._me_in(container)
        if str(msg.sender.id) == str(c.user.id):
            if not self.options["allow_message_sync"]:
                return None
            msg.cls, msg.source, msg.from_ = "send", "outer", "outer"
            msg.finish(0, "来自其他设备")
            if t == "group_message":
                msg.receiver = None
        elif msg.sender.placeholder and self.options["ignore_unknown_id"]:
            self.log.debug("dropped a message from unknown sender %s", sender_id)
            return None
        return msg

    def _find(self, lookup, id, kind):
        """lookup(id), refreshing that kind of contact once if it is missing (a group missing from the
        list is then asked for on its own)."""
        found = lookup(id)
        if found is None and id is not None:
            self._refresh_stale(kind)
            found = lookup(id)
            if found is None and kind == "group":
                found = self._add_unlisted_group(id)
        return found

    def _add_unlisted_group(self, id, seconds=30):
        """The group id, fetched on its own (at most every seconds) and added with its members, new_group
        reported; None when the upstream doesn't know it."""
        with self._refresh_lock:
            if time.time() - self._refreshed.get(("group", id), 0) < seconds:
                return self.contacts.group(id)
            self._refreshed[("group", id)] = time.time()
            try:
                group = self.upstream.fetch_group(id)
            except (UpstreamError, TransportError) as e:
                self._update_failed("群[%s]" % id, e)
                return None
            events = self.contacts.add_group(group) if group is not None else []
        self._announce(events)
        return self.contacts.group(id)

    @staticmethod
    def _member(container, id):
        for m in container.members:
            if str(m.id) == str(id):
                return m
        return None

    def _me_in(self, container):
        """Our own member in a group or discussion, else the account (no container, or not listed)."""
        me = self._member(container, self.user.id) if container is not None else None
        return me if me is not None else self.user

    def _find_member(self, container, id, in_group, uid=None):
        member = self._member(container, id)
        if member is None and in_group and time.time() - self._refreshed.get(("members", container.id), 0) > 30:
            self._refreshed[("members", container.id)] = time.time()
            self.load_members(container)
            member = self._member(container, id)
        if member is None and not in_group:
            self._refresh_stale("discuss")
            member = self._member(container, id)
        if member is None:
            cls = GroupMember if in_group else DiscussMember
            member = cls(id=id if in_group else str(id), name="昵称未知", uid=uid, placeholder=True)
            setattr(member, "group" if in_group else "discuss", container)
        return member

    # -- sending --------------------------------------------------------------

    def _next_msg_id(self):
        with self._msg_id_lock:
            self._msg_id += 1
            return self._msg_id

    def _enqueue(self, type, content, source, callback, **fields):
        if content is None or str(content) == "":
            raise ValueError("content missing")
        content = str(content)
        if not self.options["default_send_real_comp_sign"]:
            content = content.replace("<", "＜").replace(">", "＞")
        msg = Message(id=self._next_msg_id(), type=type, cls="send", content=content, from_=source,
                      source="local", ttl=self.msg_ttl, callback=callback, **fields)
        self.emit("before_send_message", msg)
        with self._cond:
            if not self.stopping:
                self._send_queue.append(msg)
                self._cond.notify_all()
                return msg
        self._finish_send(msg, -5, "客户端停止运行")
        return msg

    def send_friend_message(self, friend, content, source="code", callback=None):
        """Queue a message to a friend; the Message (see Message.wait)."""
        return self._enqueue("friend_message", content, source, callback, sender=self.user, receiver=friend)

    def send_group_message(self, group, content, source="code", callback=None):
        return self._enqueue("group_message", content, source, callback, sender=self._me_in(group), group=group)

    def send_discuss_message(self, discuss, content, source="code", callback=None):
        return self._enqueue("discuss_message", content, source, callback, sender=self._me_in(discuss),
                             discuss=discuss)

    def send_sess_message(self, member, content, source="code", callback=None):
        """Queue a temporary-session message to a GroupMember or DiscussMember; we write as the member
        we are in that group or discussion (our card there names us)."""
        in_group = isinstance(member, GroupMember)
        container = member.group if in_group else member.discuss
        return self._enqueue("sess_message", content, source, callback, sender=self._me_in(container),
                             receiver=member, via="group" if in_group else "discuss",
                             group=container if in_group else None, discuss=None if in_group else container)

    def reply_message(self, msg, content, source="code", callback=None):
        """Queue a reply to where msg came from (or went to, for a sent message)."""
        other = msg.sender if msg.cls == "recv" else msg.receiver
        if msg.type == "group_message":
            return self.send_group_message(msg.group, content, source, callback)
        if msg.type == "discuss_message":
            return self.send_discuss_message(msg.discuss, content, source, callback)
        if msg.type == "sess_message":
            return self.send_sess_message(other, content, source, callback)
        return self.send_friend_message(other, content, source, callback)

    def _send_loop(self):
        last = None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.stopping or (self._send_queue and self.state == "running"))
                if self.stopping:
                    break
                msg = self._send_queue.popleft()
            if msg.ttl <= 0:
                self._finish_send(msg, -5, "TTL失效")
                continue
            msg.ttl -= 1
            if last is not None and not self.sleep(max(0.0, last + self.send_interval - time.time())):
                with self._cond:
                    self._send_queue.appendleft(msg)
                break
            msg.time = int(time.time())
            try:
                code, info = self.upstream.send(msg)
            except Exception:
                self.log.exception("send failed")
                code, info = -1, "数据格式错误"
            last = time.time()
            if code == 0:
                self.send_failure_count = 0
                self._finish_send(msg, code, info)
                continue
            if code == -3:
                self.send_failure_count += 1
                if self.send_failure_count >= self.options["send_failure_count_max"]:
                    self.send_failure_count = 0
                    self.relogin()
            if msg.ttl > 0 and not (msg.type == "discuss_message" and code == -3):
                self.log.debug("消息[%s]发送失败 (%s)，重试", msg.id, info)
                with self._cond:
                    self._send_queue.append(msg)
            else:
                self._finish_send(msg, code, info)

    def _finish_send(self, msg, code, info):
        msg.finish(code, info)
        if msg.callback is not None:
            try:
                msg.callback(msg)
            except Exception:
                self.log.exception("send callback failed")
        self.emit("send_message", msg)

    # -- group admin ----------------------------------------------------------

    def shutup_group_member(self, group, members, seconds):
        """Mute members of group for seconds; True on success."""
        return bool(members) and self.upstream.shutup(group, members, seconds)

    def kick_group_member(self, group, members):
        """Remove members from group; True on success (and lose_group_member for each)."""
        if not (members and self.upstream.kick(group, members)):
            return False
        for member in members:
            for name, args in self.contacts.remove_group_member(group, member.id):
                self.emit(name, *args)
        return True


###############################################################################
# 9. HTTP API
###############################################################################

# Request-level codes of every HTTP face. -6 is the original's auth failure, -7 design.md's "client
# not running"; the others are ours, for requests the original answered with HTML or not at all.
AUTH_FAILED, NOT_RUNNING, NOT_FOUND, BAD_REQUEST, INTERNAL_ERROR = -6, -7, -8, -9, -10

CORS_METHODS = "OPTIONS, HEAD, GET, POST"
CORS_HEADERS = "X-Requested-With, X-Auth-Token, Content-Type, Content-Length, Authorization"
JSONP_NAME = re.compile(r"^[A-Za-z0-9_.$]{1,128}$")
QUERY_PAIR = re.compile(r"([?&;])([^=&;\s\"'#]*)(=?)([^&;\s\"'#]*)")
OWN_AGENT = "webqq/" + __version__      # the User-Agent of webqq's own requests (post_api, poll_api, OneBot)


def mask_tokens(text):
    """text with the value of every query parameter whose name, percent-decoded, mentions a token
    (access_token, %61ccess_token, ACCESS_TOKEN...) masked, for log lines."""
    def mask(match):
        sep, name, equals = match.group(1, 2, 3)
        if "token" not in urllib.parse.unquote_to_bytes(name).decode("latin-1").lower():
            return match.group(0)
        return sep + (name + "=***" if equals else "***")     # no "=": an encoded one may hide the value
    return QUERY_PAIR.sub(mask, text)


class BindError(OSError):
    """A server could not listen on its address; the text, one line, names the server, the address and why."""

    IN_USE = (errno.EADDRINUSE, 10048)      # 10048: WSAEADDRINUSE, as Windows sockets report it

    def __init__(self, server, address, error):
        host, port = address[:2]
        where = "%s:%s" % ("[%s]" % host if ":" in host else host, port)
        if error.errno in self.IN_USE:
            text = "%s无法监听%s：地址已被占用 (%s cannot listen on %s: the address is in use, by another " \
                   "program or another webqq)" % (server, where, server, where)
        else:
            text = "%s无法监听%s (%s cannot listen on %s: %s)" % (server, where, server, where,
                                                              error.strerror or error)
        OSError.__init__(self, text)
        self.errno = error.errno


class TrackedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that serves from a thread of its own and keeps track of each
    connection's thread, so that close() can end them all: every server of webqq is one.

    Threads are named <name>-<port> (the listener) and <name>-conn-<port> (a connection).
    """

    daemon_threads = True
    name = "http"
    # Windows' SO_REUSEADDR lets a second server take a port that is in use, unnoticed.
    allow_reuse_address = os.name != "nt"

    def __init__(self, address, handler):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.connections = {}  # thread -> the socket it serves
        self.connections_lock = threading.Lock()
        self._wakeup, self._waker = socket.socketpair()     # close() wakes the listener through it
        self._closing = False
        ThreadingHTTPServer.__init__(self, address, handler)
        self.thread = Thread("%s-%d" % (self.name, self.port), self._serve, (), getattr(self, "log", None))

    @property
    def port(self):
        return self.server_address[1]

    def server_bind(self):
        # HTTPServer.server_bind also looks the host name up with getfqdn(): slow, and unused here.
        try:
            socketserver.TCPServer.server_bind(self)
        except OSError as e:
            raise BindError(self.name, self.server_address, e)
        self.server_name, self.server_port = self.server_address[:2]

    def start(self):
        self.thread.start()
        return self

    def _serve(self, poll_interval=0.1):
        """The listener thread: accept connections and call service_actions() every poll_interval until
        close(), which (unlike socketserver's shutdown()) need not wait for the next poll."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wakeup, selectors.EVENT_READ)
            while not self._closing:
                ready = selector.select(poll_interval)
                if self._closing:
                    break
                if any(key.fileobj is self for key, _ in ready):
                    self._handle_request_noblock()
                self.service_actions()

    def process_request(self, request, client_address):
        self.spawn(self.process_request_thread, request, client_address)

    def spawn(self, target, request, *args):
        """Run target(request, *args) on a connection thread of its own, tracked until it returns."""
        thread = Thread("%s-conn-%d" % (self.name, self.port), self._run_tracked, (target, request) + args,
                        getattr(self, "log", None))
        with self.connections_lock:
            self.connections[thread] = request
        thread.start()

    def _run_tracked(self, target, request, *args):
        try:
            target(request, *args)
        finally:
            with self.connections_lock:
                self.connections.pop(threading.current_thread(), None)

    def track(self, sock):
        """The socket this connection thread really uses (a TLS one wraps the accepted socket)."""
        with self.connections_lock:
            self.connections[threading.current_thread()] = sock

    def drop(self, sock):
        """Shut a connection's socket down and close it."""
        socketserver.TCPServer.shutdown_request(self, sock)

    def server_close(self):
        ThreadingHTTPServer.server_close(self)
        self._wakeup.close()
        self._waker.close()

    def close(self, timeout=5.0):
        """Stop accepting, cut every open connection and wait for the listener and connection threads."""
        if self.thread.is_alive():
            self._closing = True
            self._waker.send(b"\0")
            if self.thread is not threading.current_thread():
                self.thread.join()
        self.server_close()
        with self.connections_lock:
            connections = list(self.connections.items())
        for _, sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread, _ in connections:
            if thread is not threading.current_thread():
                thread.join(timeout)


# -- requests and answers ---------------------------------------------------------


class ApiError(Exception):
    """A request an HTTP face refuses: the HTTP status, the Openqq code and a readable status."""

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
    """What an HTTP face answers: body bytes, HTTP status, headers, and what to do if it can't be delivered.

    `wait_for` = (ready, seconds) is no answer yet: ask again once ready() is true or seconds passed.
    `stream` (a Stream) is an answer without end: body is its beginning, the stream gives the rest.
    """

    __slots__ = ("body", "status", "headers", "content_type", "undelivered", "wait_for", "stream")

    def __init__(self, body, status=200, headers=(), content_type="application/json; charset=utf-8"):
        self.body = body
        self.status = status
        self.headers = list(headers)
        self.content_type = content_type
        self.undelivered = None
        self.wait_for = None
        self.stream = None


class Stream(object):
    """The rest of an answer without end (Server-Sent Events), written as it comes.

    Subclasses give pull(timeout, alive): the bytes to write next, waiting up to timeout seconds for
    some; b"" when none came, None when the stream is over. On a server with a Parker, pull(0) is
    called after each notice() and no thread waits; elsewhere (TLS) the connection's thread waits in
    pull. After `keep_alive` seconds without a write, idle() is written so that proxies keep it open.
    """

    keep_alive = 15.0
    content_type = "text/event-stream; charset=utf-8"

    def pull(self, timeout=0.0, alive=None):
        raise NotImplementedError

    def idle(self):
        return b": keep-alive\n\n"

    def response(self, first=b"", headers=()):
        """The Response that begins this stream with the bytes first."""
        resp = Response(first, 200, [("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")] + list(headers),
                        self.content_type)
        resp.stream = self
        return resp


def as_response(result):
    """A route's result as a Response: one already, JSON bytes, or data to serialise."""
    if isinstance(result, Response):
        return result
    return Response(result if isinstance(result, bytes) else json_dumps(result).encode("utf-8"))


class Request(object):
    """One call to an HTTP face, whether it came over HTTP or in-process (a poll_api redirect).

    `params` are parsed from the query and the body when first read (ApiError 400 if they can't be);
    `query` and `body` stay as they came, for a proxy to pass on. `parkable`: a long-poll may answer
    wait_for instead of waiting on this thread (see Parker); `wait`: seconds it may still wait, when
    not the route's own timeout.
    """

    __slots__ = ("method", "path", "headers", "scheme", "alive", "trusted", "parkable", "wait", "query",
                 "body", "_params")

    def __init__(self, method, path, query="", body=b"", headers=None, scheme="http", alive=None,
                 trusted=False, params=None):
        self.method = method
        self.path = path
        self.query = query
        self.body = body
        self.headers = headers or {}
        self.scheme = scheme
        self.alive = alive or (lambda: True)
        self.trusted = trusted
        self.parkable = False
        self.wait = None
        self._params = params

    @property
    def params(self):
        if self._params is None:
            try:
                query = self.query.encode("latin-1")      # as http.server decoded it
            except UnicodeEncodeError:
                query = self.query.encode("utf-8")        # text given in-process
            self._params = parse_params(query, self.headers.get("content-type"), self.body)
        return self._params

    @params.setter
    def params(self, params):
        self._params = params

    def param(self, name):
        """The parameter's value (the first one if it was repeated), or None."""
        value = self.params.get(name)
        return value[0] if isinstance(value, tuple) else value


def unquote_param(raw, charset):
    """Percent-decode every byte of a query or form component, '+' read as a space."""
    data = urllib.parse.unquote_to_bytes(raw.replace(b"+", b" "))
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
            add_param(params, unquote_param(name, "utf-8"), unquote_param(value, "utf-8"))
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
                add_param(params, unquote_param(name, charset), unquote_param(value, charset))
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


# -- who may call ---------------------------------------------------------------------


def url_origin(url):
    """scheme://host[:port] of a URL, lower-cased, or None."""
    try:
        parts = urllib.parse.urlsplit(url or "")
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
                self.log.warning("auth callback failed: %s", e)
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


def check_protected(entries, token, auth, allow_insecure, what="openqq"):
    """Protected mode: refuse a listen address beyond loopback when nothing guards it."""
    exposed = [e["host"] or "*" for e in entries if not is_loopback(e["host"], resolve=True)]
    if exposed and not token and auth is None and not allow_insecure:
        raise ValueError(
            "%s refuses to listen on %s without access_token (protected mode): set "
            "access_token, listen on 127.0.0.1, or set allow_insecure=1 if a firewall or "
            "proxy guards the port" % (what, ", ".join(exposed)))


# -- routes ----------------------------------------------------------------------------


class Api(object):
    """What an HTTP face answers, one request at a time: guard, route, answer. Subclasses give
    route(req), the handler of a request, which returns a Response or JSON-able data or raises
    ApiError. A guard (a Guard) decides who may call and the browser rules; None lets every caller
    through to the handler. `jsonp` answers ?datatype=jsonp&callback=NAME as JavaScript."""

    name = "api"
    jsonp = False

    def __init__(self, guard, log):
        self.guard = guard
        self.log = log

    def handle(self, req):
        """Answer one request; never raises."""
        callback = None
        try:
            if self.guard is not None:
                self.guard.check(req)
                if req.method == "OPTIONS":
                    return Response(b"", 200, self.guard.cors_headers(req, preflight=True))
            handler = self.route(req)
            callback = self.callback(req)
            resp = as_response(handler(req))
        except ApiError as e:
            resp = e.response()
        except Exception:
            self.log.exception("%s %s failed", self.name, req.path)
            resp = ApiError(500, INTERNAL_ERROR, "internal error").response()
        if callback is not None and resp.stream is None:
            resp.body = b"%s(%s)" % (callback.encode("ascii"), resp.body)
            resp.content_type = "application/javascript; charset=utf-8"
        if self.guard is not None:
            resp.headers.extend(self.guard.cors_headers(req))
        return resp

    def route(self, req):
        raise ApiError(403, NOT_FOUND, "api not found")

    def callback(self, req):
        """The JSONP function name a request asks its answer to be wrapped in, or None."""
        if not self.jsonp or req.param("datatype") != "jsonp":
            return None
        callback = req.param("callback") or "jsoncallback%d" % time.time()
        if not JSONP_NAME.match(callback):
            raise bad_request("callback must match [A-Za-z0-9_.$]{1,128}")
        return callback


# -- serving --------------------------------------------------------------------------


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
    """One connection of an ApiServer: reads requests, hands them to its Api, writes the answers; keep-alive."""

    protocol_version = "HTTP/1.1"
    server_version = OWN_AGENT
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
        except ApiError as e:
            self.close_connection = True     # the body may be unread: don't parse it as a request
            self.send(e.response())
            return
        resp = self.server.api.handle(req)
        if resp.wait_for is not None:
            if not self.buffered():
                self.park(req, *resp.wait_for)
                return
            req.parkable, req.trusted = False, True      # a next request is already here: wait on this thread
            resp = self.server.api.handle(req)
        if resp.stream is not None:
            self.close_connection = True    # the answer ends when the connection does
            if self.send(resp) and self.command != "HEAD":
                self.follow(resp.stream)
            return
        self.send(resp)

    do_POST = do_HEAD = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = do_GET

    def buffered(self):
        """True when bytes of a next request already sit in this connection's read buffer."""
        self.connection.settimeout(0)
        try:
            return bool(self.rfile.peek(1))
        except OSError:
            return False
        finally:
            self.connection.settimeout(self.socket_timeout)

    def park(self, req, ready, timeout, stream=None):
        """Leave req (or a stream) to the server's Parker: this thread ends and the connection waits without one."""
        entry = Parked(self, req, ready, timeout, stream)
        with self.server.connections_lock:
            self.server.parking[self.connection] = entry
        self.close_connection = True

    def follow(self, stream):
        """Write the rest of a stream: the Parker does, or (no Parker) this thread until the client leaves."""
        if self.server.parker is not None:
            self.park(None, None, stream.keep_alive, stream)
            return
        connection = self.connection
        alive = lambda: peer_alive(connection)
        while alive():
            data = stream.pull(stream.keep_alive, alive)
            if data is None:
                return
            try:
                self.wfile.write(data or stream.idle())
            except OSError:
                return

    def read_request(self):
        """The Request on this connection, its body read whole; ApiError when it can't be."""
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
        connection = self.connection
        req = Request(self.command, path, query.partition("#")[0], body, headers,
                      "https" if self.server.tls is not None else "http", lambda: peer_alive(connection))
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
        server, limit = self.server, self.server.max_body_size
        coding = headers.get("transfer-encoding", "").strip().lower()
        length = headers.get("content-length")
        if server.length_required and length is None and (self.command == "POST" or coding):
            raise ApiError(411, BAD_REQUEST, "Content-Length required")
        if coding and coding != "identity":
            if coding != "chunked":
                raise bad_request("unsupported Transfer-Encoding", 400)
            return self.read_chunked(limit)
        if length is None:
            return b""
        size = to_int(length)
        if size is None or size < 0:
            raise bad_request("invalid Content-Length")
        if size > limit:
            raise bad_request("%s over %d bytes" % (server.body_name, limit), 413)
        body = self.rfile.read(size) or b""     # None: the kernel timeout ended the wait
        if len(body) < size:
            raise bad_request("%s shorter than its Content-Length" % server.body_name)
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
                raise bad_request("%s over %d bytes" % (self.server.body_name, limit), 413)
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
                 "Date: " + self.server.date()]
        if resp.status != 204:
            lines.append("Content-Type: " + resp.content_type)
            if resp.stream is None:
                lines.append("Content-Length: %d" % len(resp.body))
            lines.append("X-Content-Type-Options: nosniff")
        lines.extend("%s: %s" % pair for pair in resp.headers)
        if self.close_connection:
            lines.append("Connection: close")
        elif getattr(self, "request_version", "") == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"), body

    def send(self, resp):
        """Write resp; if the caller is gone, let it take its items back. True when it was written."""
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
            return False
        self.log_request(resp.status, len(body))
        return True

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
            error.headers.append(("Allow", CORS_METHODS))
        self.send(error.response())

    def log_message(self, fmt, *args):
        if self.server.log.isEnabledFor(logging.DEBUG):     # formatting every request line costs
            self.server.log.debug("%s %s %s", self.server.name, self.address_string(), mask_tokens(fmt % args))


class ApiServer(TrackedHTTPServer):
    """One listen address of an HTTP face: a thread per connection, capped in number, each request
    guarded and answered by its Api; optional TLS; long-polls parked without a thread (parking=True).

    A subclass names itself (`name`, in thread names and logs), what a body is (`body_name`, in
    refusals) and whether bodies need a Content-Length (`length_required`)."""

    name = "api"
    body_name = "request body"
    length_required = False
    request_queue_size = 1024
    # The limits opts may change: seconds a request may take to arrive whole (and an idle connection
    # may stay open), the largest body in bytes, open connections at most.
    request_timeout, max_body_size, max_connections = 60.0, 1048576, 2000
    # Bytes a stream's client may leave unread beyond the kernel's buffers before its connection is cut.
    stream_backlog = 1048576

    def __init__(self, entry, api, log, opts=None, parking=False):
        self.api = api
        self.log = log
        self.entry = entry
        self.parker = None
        self.tls = tls_context(entry) if entry.get("tls") else None
        for limit in ("request_timeout", "max_body_size", "max_connections"):
            if (opts or {}).get(limit) is not None:
                setattr(self, limit, opts[limit])
        self.deadlines = {}     # socket -> when its request must have arrived whole (slow-loris guard)
        self.parking = {}       # socket -> Parked, until its connection thread lets go of the socket
        self._date = (0, "")
        TrackedHTTPServer.__init__(self, (entry["host"], entry["port"]), Handler)
        if parking and self.tls is None:
            self.parker = Parker(self)

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

    def notice(self):
        """Something a parked request may wait for has happened: the parker asks them again."""
        if self.parker is not None:
            self.parker.notice()

    def process_request(self, request, client_address):
        with self.connections_lock:
            parked = len(self.parker) if self.parker is not None else 0
            full = len(self.connections) + parked >= self.max_connections
        if full:
            self.refuse(request)
        else:
            self.spawn(self.process_request_thread, request, client_address)

    def shutdown_request(self, request):
        """The end of a connection thread: the parker takes the connection if it was parked, else it closes."""
        with self.connections_lock:
            entry = self.parking.pop(request, None)
            if entry is not None:       # counted as parked from now on, no longer as this thread's
                self.connections.pop(threading.current_thread(), None)
                self.parker.park(entry)
        if entry is None:
            self.drop(request)

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
            self.drop(request)
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
        self.drop(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (OSError, ssl.SSLError, ValueError)):
            self.log.debug("%s connection from %s ended: %s", self.name, client_address[0], error)
        else:
            self.log.exception("%s connection from %s failed", self.name, client_address[0])

    def server_close(self):
        TrackedHTTPServer.server_close(self)
        if self.parker is not None:
            self.parker.stop()


class Parked(object):
    """A connection the Parker holds: waiting for its answer (req), idle (req None), or streaming (stream):
    then `out` holds what its client has not taken yet and `deadline` is the time of the next keep-alive."""

    __slots__ = ("sock", "address", "handler", "req", "ready", "deadline", "keep_alive", "stream", "out", "events")

    def __init__(self, handler, req, ready, timeout, stream=None):
        self.sock, self.address, self.handler = handler.connection, handler.client_address, handler
        self.req, self.ready, self.stream = req, ready, stream
        self.deadline = time.monotonic() + timeout
        self.keep_alive = not handler.close_connection
        self.out = bytearray()
        self.events = selectors.EVENT_READ


class Parker(object):
    """Long-polls (check_event) and streams (/openqq/events) waiting without a thread each, served
    together by one thread.

    A waiting thread costs little until the event comes; then waking a thousand of them at once
    keeps the interpreter lock busy for most of a second, while one thread writes a thousand
    answers in milliseconds. After its answer a connection stays here, idle, until its next
    request arrives, which gets a thread again. A stream stays here until its client leaves: what
    the socket can't take at once waits in the entry, up to the server's stream_backlog, beyond which
    the connection is cut (an EventSource comes back and resumes from the last event it got).
    TLS connections wait on their own threads. Whoever makes a parked request ready, or has something
    for the streams, calls notice() (ApiServer.notice).
    """

    def __init__(self, server):
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.wakeup, self.waker = socket.socketpair()
        for sock in (self.wakeup, self.waker):
            sock.setblocking(False)
        self.selector.register(self.wakeup, selectors.EVENT_READ)
        self.lock = threading.Lock()
        self.arriving = []
        self.parked = {}            # socket -> Parked; only the parker's thread changes it
        self.news = False           # something changed: some waiting request may be ready
        self.stopping = False
        self.thread = Thread("%s-park-%d" % (server.name, server.port), self.run, log=server.log)

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
                stopping = self.stopping
                arriving, self.arriving = self.arriving, []
                news, self.news = self.news, False
            for entry in arriving:
                entry.sock.settimeout(0)
                self.parked[entry.sock] = entry
                self.selector.register(entry.sock, selectors.EVENT_READ, entry)
            now = time.monotonic()
            # After news every entry may be ready; otherwise only those just parked (news came before them).
            woken = dict.fromkeys(e for e in (self.parked.values() if news else arriving)
                                  if e.stream is not None or (e.req is not None and e.ready()))
            for entry in list(woken) + [e for e in self.parked.values() if e.deadline <= now and e not in woken]:
                try:
                    if entry.stream is None:
                        self.due(entry)
                    else:
                        self.pump(entry, entry in woken, now)
                except Exception:
                    self.server.log.exception("%s parked request failed", self.server.name)
                    self.drop(entry)
            if stopping:    # after a last round: what a stopping plugin made ready (a closed hub) is answered
                return
            soonest = min([e.deadline for e in self.parked.values()] or [now + 60])
            for key, mask in self.selector.select(max(0.0, soonest - time.monotonic())):
                if key.data is None:
                    while self.wakeup.recv(4096) == 4096:
                        pass
                    continue
                if mask & selectors.EVENT_WRITE and key.data.sock in self.parked:
                    self.flush(key.data)
                if mask & selectors.EVENT_READ and key.data.sock in self.parked:
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

    def pump(self, entry, pull, now):
        """Write what a stream has for its client; after keep_alive seconds of silence, its idle() bytes."""
        data = entry.stream.pull() if pull else b""
        if data is None:
            self.drop(entry)
            return
        if not data and not entry.out and entry.deadline <= now:
            data = entry.stream.idle()
        if data:
            entry.out += data
            entry.deadline = now + entry.stream.keep_alive
        elif entry.deadline <= now:
            entry.deadline = now + entry.stream.keep_alive
        self.flush(entry)

    def flush(self, entry):
        """Send what the stream's socket takes now; watch it for room while more waits, cut it beyond the backlog."""
        if entry.out:
            try:
                sent = entry.sock.send(entry.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.drop(entry)
                return
            del entry.out[:sent]
        if len(entry.out) > self.server.stream_backlog:
            self.server.log.info("%s stream to %s cut: %d bytes behind (it may come back and resume)",
                                 self.server.name, entry.address[0], len(entry.out))
            self.drop(entry)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if entry.out else 0)
        if events != entry.events:
            entry.events = events
            self.selector.modify(entry.sock, events, entry)

    def readable(self, entry):
        try:
            data = entry.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or entry.stream is not None:
            self.drop(entry)                # the client hung up (nothing was taken for it), or spoke on a stream
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
        self.server.drop(entry.sock)

    def stop(self):
        """End the thread and close every connection held here."""
        with self.lock:
            self.stopping = True
        self.wake()
        if self.thread.ident is not None and self.thread is not threading.current_thread():
            self.thread.join()
        for entry in list(self.parked.values()) + self.arriving:
            self.server.drop(entry.sock)
        self.parked.clear()
        self.arriving = []
        self.selector.close()
        self.wakeup.close()
        self.waker.close()


def tls_context(entry):
    """The server-side SSLContext of a TLS listen entry; a CA file makes client certificates required."""
    if not entry.get("tls_cert") or not entry.get("tls_key"):
        raise ValueError("TLS on %s:%s needs tls_cert and tls_key" % (entry["host"], entry["port"]))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(entry["tls_cert"], entry["tls_key"])
    if entry.get("tls_ca"):
        ctx.load_verify_locations(entry["tls_ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED
    if entry.get("tls_ciphers"):
        ctx.set_ciphers(entry["tls_ciphers"])
    return ctx


def parse_listen(text):
    """"host:port" (or ":port", "port", "[::1]:port") as a listen entry {host, port}; ValueError otherwise."""
    text = str(text).strip()
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise ValueError("listen address %r is not host:port" % text)
    if int(port) > 65535:
        raise ValueError("listen address %r: port %s is out of range (0 to 65535)" % (text, port))
    return {"host": host, "port": int(port)}


def check_listen(value):
    """A check: listen addresses (host:port text, comma-separated, or {host, port} objects, or a list of them)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, dict):
            port = to_int(item.get("port", 0))
            if port is None or not 0 <= port <= 65535:
                raise ValueError("must be host:port with a port from 0 to 65535, not %s" % json_dumps(item))
            continue
        for text in str(item).split(","):
            try:
                parse_listen(text)
            except ValueError:
                raise ValueError("must be host:port with a port from 0 to 65535, not %r" % text.strip())
    return value


def listen_entries(value, tls=None, default_port=5000):
    """A listen option (entries {host, port[, tls, tls_*]}, "host:port" texts, a list or one of
    them) as a list of {host, port, tls, tls_*} entries; tls: the tls_* defaults of every entry."""
    if value is None:
        value = [{"host": "127.0.0.1", "port": default_port}]
    elif isinstance(value, dict):
        value = [value]
    elif isinstance(value, (str, int)):
        value = to_list(str(value))
    entries = []
    for item in value:
        entry = dict(parse_listen(item) if isinstance(item, str) else item)
        for key in ("tls_cert", "tls_key", "tls_ca", "tls_ciphers"):
            entry.setdefault(key, (tls or {}).get(key))
        entry["tls"] = to_bool(entry.get("tls", entry.get("tls_cert") is not None))
        entry["host"] = str(entry.get("host", "127.0.0.1")).strip("[]")
        port = to_int(entry.get("port", 443 if entry["tls"] else default_port))
        if port is None or not 0 <= port <= 65535:
            raise ValueError("invalid listen port %r" % entry.get("port"))
        entry["port"] = port
        entries.append(entry)
    return entries


def serve(server_class, entries, api, log, opts=None, parking=False):
    """One started server_class (an ApiServer) per listen entry; none if one of them can't listen."""
    servers = []
    try:
        for entry in entries:
            servers.append(server_class(entry, api, log, opts, parking))
    except Exception:
        for server in servers:
            server.server_close()
        raise
    return [server.start() for server in servers]


def points_into(url, servers):
    """True when url points into the /openqq/ API of these servers."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.path.startswith("/openqq/"):
        return False
    host = (parts.hostname or "").lower()
    return any(server.port == port and (parts.scheme == "https") == (server.tls is not None)
               and (is_loopback(host) or host == server.entry["host"].lower())
               for server in servers)


class Poller(object):
    """poll_api: GET a URL forever, poll_interval apart; a redirect into the owner's own API is called
    in-process, as a trusted caller.

    owner (the Openqq plugin, or the controller) has log, opts (poll_interval, poll_timeout),
    stopped (an Event), api, owns(url) (points_into its servers) and polling(): whether to poll now."""

    def __init__(self, owner, url, name):
        self.owner = owner
        self.url = url
        self.http = Http(log=owner.log, user_agent=OWN_AGENT)
        self.thread = Thread(name, self.run, log=owner.log)

    def run(self):
        stopped = self.owner.stopped
        while not stopped.is_set():
            if self.owner.polling():
                try:
                    self.poll()
                except Exception:
                    self.owner.log.exception("poll_api failed")
            stopped.wait(self.owner.opts["poll_interval"])

    def poll(self):
        log = self.owner.log
        try:
            res = self.http.request("GET", self.url, timeout=self.owner.opts["poll_timeout"], follow=False)
        except TransportError as e:
            if not self.owner.stopped.is_set():
                log.warning("poll_api %s failed: %s", mask_tokens(self.url), e)
            return
        status = res.status
        if status in (301, 302, 303, 307, 308) and res.headers.get("location"):
            target = urllib.parse.urljoin(self.url, res.headers["location"])
            if not self.owner.owns(target):
                log.warning("poll_api redirect to %s not followed: not this server's API", mask_tokens(target))
                return
            resp = self.call(target)
            log.debug("poll_api called %s: %d %s", mask_tokens(target), resp.status, resp.body[:200])
        elif not 200 <= status < 300:
            log.warning("poll_api %s answered HTTP %d", mask_tokens(self.url), status)

    def call(self, url):
        """GET one of the owner's own URLs in-process."""
        parts = urllib.parse.urlsplit(url)
        return self.owner.api.handle(Request("GET", parts.path, parts.query, trusted=True))

    def start(self):
        self.thread.start()

    def stop(self):
        """Wait for the thread (the owner's stopped is set), cutting a poll in flight."""
        while self.thread.is_alive() and self.thread is not threading.current_thread():
            self.http.abort()       # again: a poll may have begun just after the first abort
            self.thread.join(0.2)


###############################################################################
# 10. QR display
###############################################################################

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _unfilter(kind, line, prev, bpp):
    """Undo one PNG scanline filter in place."""
    if kind == 1:
        for i in range(bpp, len(line)):
            line[i] = (line[i] + line[i - bpp]) & 0xFF
    elif kind == 2:
        for i in range(len(line)):
            line[i] = (line[i] + prev[i]) & 0xFF
    elif kind == 3:
        for i in range(len(line)):
            left = line[i - bpp] if i >= bpp else 0
            line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
    elif kind == 4:
        for i in range(len(line)):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    elif kind != 0:
        raise ValueError("bad PNG filter %d" % kind)


def decode_png(data):
    """(width, height, rows): a non-interlaced PNG as rows of grey levels 0-255, alpha over white."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG")
    pos, idat, palette, header = 8, [], None, None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"PLTE":
            palette = [tuple(chunk[i:i + 3]) for i in range(0, len(chunk), 3)]
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without IHDR")
    width, height, depth, color, _, _, interlace = header
    if interlace or color not in (0, 2, 3, 4, 6) or (color == 3 and not palette):
        raise ValueError("unsupported PNG (color type %d, interlace %d)" % (color, interlace))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    bits = channels * depth
    stride, bpp = (width * bits + 7) // 8, max(1, bits // 8)
    raw = zlib.decompress(b"".join(idat))
    top = (1 << depth) - 1
    rows, prev = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = bytearray(raw[start + 1:start + 1 + stride])
        _unfilter(raw[start], line, prev, bpp)
        prev = line
        if depth < 8:
            samples = [(line[i * depth // 8] >> (8 - depth - (i * depth) % 8)) & top for i in range(width * channels)]
        else:
            step = depth // 8
            samples = line[::step]
        row = []
        for x in range(width):
            s = samples[x * channels:(x + 1) * channels]
            if color == 3:
                r, g, b = palette[s[0]]
                grey = (r * 299 + g * 587 + b * 114) // 1000
            elif color in (2, 6):
                grey = (s[0] * 299 + s[1] * 587 + s[2] * 114) // 1000
            else:
                grey = s[0] * 255 // top if depth < 8 else s[0]
            if color in (4, 6):
                alpha = s[-1]
                grey = (grey * alpha + 255 * (255 - alpha)) // 255
            row.append(grey)
        rows.append(row)
    return width, height, rows


def qr_matrix(png):
    """The QR code in a PNG as rows of booleans (True = dark module), found from its finder pattern."""
    width, height, rows = decode_png(png)
    dark = [[v < 128 for v in row] for row in rows]
    ys = [y for y in range(height) if any(dark[y])]
    if not ys:
        raise ValueError("no QR code in the image")
    y0, y1 = ys[0], ys[-1]
    x0 = dark[y0].index(True)
    x1 = max(len(row) - 1 - row[::-1].index(True) for row in dark if any(row))
    run = 0
    while x0 + run < width and dark[y0][x0 + run]:
        run += 1
    module = run / 7.0
    size = int(round((x1 - x0 + 1) / module))
    if size < 21 or module < 1:
        raise ValueError("no QR finder pattern in the image")
    return [[dark[min(y1, int(y0 + (j + 0.5) * module))][min(x1, int(x0 + (i + 0.5) * module))]
             for i in range(size)] for j in range(size)]


# White on black: the drawing then scans on light terminals as well as on dark ones.
ANSI_QR, ANSI_RESET = "\x1b[97;40m", "\x1b[0m"


def draw_qrcode(matrix, ascii=False, quiet=2, color=False):
    """Text drawing of a QR matrix for a dark terminal: light modules are drawn, dark ones left blank.

    Half blocks put two module rows on one text line; ascii draws each module as "@@" or "  ";
    color wraps each line in ANSI white-on-black.
    """
    width = len(matrix[0]) + 2 * quiet
    light = [[True] * width for _ in range(quiet)]
    light += [[True] * quiet + [not d for d in row] + [True] * quiet for row in matrix]
    light += [[True] * width for _ in range(quiet)]
    if ascii:
        lines = ["".join("@@" if cell else "  " for cell in row) for row in light]
    else:
        if len(light) % 2:
            light.append([False] * len(light[0]))
        blocks = {(True, True): "\u2588", (True, False): "\u2580", (False, True): "\u2584", (False, False): " "}
        lines = ["".join(blocks[(a, b)] for a, b in zip(light[y], light[y + 1])) for y in range(0, len(light), 2)]
    if color:
        lines = [ANSI_QR + line + ANSI_RESET for line in lines]
    return "\n".join(lines) + "\n"


def can_encode(stream, text):
    """True when stream's encoding can write text."""
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


# Encodings (and Windows code pages) of East Asian consoles, whose fonts draw block characters
# two columns wide: there the QR is drawn with "@@" pairs.
CJK_ENCODINGS = frozenset(("gbk", "gb2312", "gb18030", "big5", "big5hkscs", "shift_jis", "euc_jp", "euc_kr",
                           "cp932", "cp949", "cp950", "johab"))
CJK_CODEPAGES = frozenset((932, 936, 949, 950, 54936))


def console_codepage():
    """The Windows console's output code page, or None elsewhere."""
    if os.name != "nt":
        return None
    try:
        import ctypes
        return ctypes.windll.kernel32.GetConsoleOutputCP() or None
    except (ImportError, AttributeError, OSError):
        return None


def wide_blocks(stream):
    """True when block characters would be unreadable on stream: not encodable, or drawn double-width."""
    try:
        encoding = codecs.lookup(getattr(stream, "encoding", None) or "ascii").name.replace("-", "_")
    except LookupError:
        return True
    return (encoding in CJK_ENCODINGS or console_codepage() in CJK_CODEPAGES
            or not can_encode(stream, "\u2588\u2580\u2584"))


def terminal_size(stream):
    """(columns, lines) of the terminal stream writes to, or None when it is not a terminal."""
    try:
        if stream.isatty():
            return tuple(os.get_terminal_size(stream.fileno()))
    except (AttributeError, OSError, ValueError):
        pass
    return None


def text_size(text):
    """(columns, lines) a drawing occupies, ANSI codes left out."""
    lines = text.rstrip("\n").split("\n")
    return max(len(line.replace(ANSI_QR, "").replace(ANSI_RESET, "")) for line in lines), len(lines)


def fit_qrcode(matrix, ascii, size, color=False):
    """(text, fits): the drawing with the widest quiet zone (2, else 1) that fits in size."""
    drawings = []
    for quiet in (2, 1):
        drawings.append(draw_qrcode(matrix, ascii=ascii, quiet=quiet, color=color))
        columns, lines = text_size(drawings[-1])
        if size is None or (columns <= size[0] and lines < size[1]):
            return drawings[-1], True
    return drawings[0], False


def show_qrcode_in_terminal(path, png, stream=None):
    """input_qrcode handler: draw the QR on standard output, sized to the terminal, in a form it can show."""
    stream = stream or sys.stdout
    log = logging.getLogger("webqq")
    try:
        matrix = qr_matrix(png)
    except ValueError as e:
        log.warning("二维码无法在终端显示 (%s)，请打开 %s", e, path)
        return
    size = terminal_size(stream)
    color = size is not None and os.name != "nt" and os.environ.get("TERM") != "dumb"
    text, fits = fit_qrcode(matrix, wide_blocks(stream), size, color)
    if not fits:
        needed = text_size(text)
        log.warning("终端窗口太小，二维码可能无法扫描 (the QR code needs %dx%d characters, the window has %dx%d: "
                    "enlarge the window or make the font smaller, or open %s)", *(needed + size + (path,)))
    stream.write("\n" + text)
    stream.flush()


def print_qrcode_path(path, png=None, stream=None):
    """input_qrcode handler: print the QR file's path as a file:// link."""
    import pathlib
    stream = stream or sys.stdout
    stream.write("二维码 (QR code): %s\n" % pathlib.Path(os.path.abspath(path)).as_uri())
    stream.flush()


def desktop_viewer():
    """The command that opens an image on this desktop, or None where there is no desktop."""
    if os.name == "nt":
        return "startfile"
    if sys.platform == "darwin":
        return "open"
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        for command in ("xdg-open", "gio", "display", "eog"):
            if shutil.which(command):
                return command
    return None


def open_qrcode_in_viewer(path, png=None):
    """input_qrcode handler: open the QR file with the desktop's image viewer, if there is one."""
    import subprocess
    log = logging.getLogger("webqq")
    viewer = desktop_viewer()
    try:
        if viewer == "startfile":
            os.startfile(path)
        elif viewer is not None:
            args = [viewer, "open", path] if viewer == "gio" else [viewer, path]
            subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            log.debug("no desktop: the QR code is at %s", path)
    except OSError as e:
        log.warning("无法打开二维码图片 (%s): %s", e, path)


QR_DISPLAYS = {"terminal": show_qrcode_in_terminal, "file": print_qrcode_path, "viewer": open_qrcode_in_viewer}
QR_HELP = {"terminal": "terminal (drawn in this window)", "file": "file (its path printed)",
           "viewer": "viewer (opened in the image viewer)"}
# Modes a plugin provides, by the plugin's name: loading the plugin turns the mode on (unless the modes are none).
QR_PLUGINS = {"console": "console", "email": "qrmail"}


def start_qr_displays(client):
    """Turn on the QR displays qrcode_display names (the built-in ones, and the plugins loaded that show QR
    codes, which have qr_display and show_qrcode), and log each one: only when the upstream shows QR codes."""
    if not getattr(client.upstream, "qr_login", True):
        return
    log, modes = client.log, qr_modes(client.options["qrcode_display"])
    for mode in modes:
        if mode == "viewer" and desktop_viewer() is None:
            log.info("二维码显示方式 viewer: 没有桌面，不打开图片 (QR display viewer is off: no desktop)")
        elif mode in QR_DISPLAYS:
            client.on("input_qrcode", QR_DISPLAYS[mode])
            log.info("二维码显示方式 (QR display): %s", QR_HELP[mode])
        elif mode in QR_PLUGINS and client.plugin(QR_PLUGINS[mode]) is None:
            log.warning("二维码显示方式 %s 需要插件 %s (QR display %s needs the %s plugin: add a [%s] section)",
                        mode, QR_PLUGINS[mode], mode, QR_PLUGINS[mode], QR_PLUGINS[mode])
    for name, plugin in client.plugins:
        if not hasattr(plugin, "show_qrcode"):
            continue
        if modes == ["none"]:
            log.info("二维码显示方式 none: 插件 %s 不显示二维码 (qrcode_display is none: the %s plugin shows no QR code)",
                     name, name)
            continue
        client.on("input_qrcode", plugin.show_qrcode)
        log.info("二维码显示方式 (QR display): %s", plugin.qr_display)


###############################################################################
# 11. Config and CLI
###############################################################################

CONFIG_NAME = "webqq.ini"
ENV_PREFIX = "WEBQQ_"

# Options of the program around the client, set in [webqq] next to the client's.
MAIN_OPTIONS = collections.OrderedDict([
    ("restart", (False, "start a new client after one stopped with an error (logged out, login failed)")),
    ("restart_delay", (5.0, "seconds before the first restart; the wait doubles after each one")),
    ("restart_delay_max", (300.0, "longest wait between two restarts, in seconds")),
    ("pause_on_error", ("auto", "wait for Enter after a fatal error: yes, no, auto (when the window would close)",
                        yes_no_auto)),
])

# What the command line uses when nothing sets it: the plugins, and client options it sets differently.
DEFAULT_PLUGINS = ("showmsg", "openqq", "console")
OPTIONAL_PLUGINS = ("qrmail", "onebot")
CLI_DEFAULTS = {"qrcode_display": "terminal,viewer"}

# Client and main options by topic, for --help and the written config; others go to the last topic.
TOPICS = [
    ("account and login", "account tmpdir upstream upstream_options smartqq_base mode keep_cookie check_account"),
    ("QR code", "qrcode_display qrcode_count_max qr_check_interval"),
    ("messages and contacts", "send_interval msg_ttl update_interval load_members ignore_unknown_id "
                              "allow_message_sync default_send_real_comp_sign group_member_card_cut_length "
                              "group_member_use_friend_markname"),
    ("upstream connection", "poll_timeout http_timeout poll_failure_count_max send_failure_count_max"),
    ("running for real", "restart restart_delay restart_delay_max relogin_at pause_on_error controller_pid "
                         "controller_pid_path controller_grace"),
    ("logging", "log_level log_path"),
    ("files", "cookie_path qrcode_path pid_path state_path"),
]


class ConfigError(ValueError):
    """A mistake in the configuration, told with where it is: file and line, variable or flag."""

    def __init__(self, where, message):
        ValueError.__init__(self, "%s: %s" % (where, message))
        self.where = where


def top_options():
    """Every option of the [webqq] section: the client's, then main()'s."""
    table = collections.OrderedDict(Client.OPTIONS)
    table.update(MAIN_OPTIONS)
    return table


def plugin_options(name):
    """The options of a plugin's OPTIONS table that a file can set (those with a help); NoPlugin if
    there is no plugin called name."""
    table = getattr(plugin_module(name), "OPTIONS", {})
    return collections.OrderedDict((key, entry) for key, entry in table.items() if entry[1] is not None)


def convert_value(text, default):
    """A config text as the type of default: boolean, number, JSON (lists, objects), else the text."""
    text = text.strip()
    if isinstance(default, bool):
        if yes_no(text) is None:
            raise ValueError("must be true or false, not %r" % text)
        return yes_no(text)
    if isinstance(default, (int, float)):  # plugins' seconds often have int defaults: 2.5 is fine there
        for number in ((int, float) if isinstance(default, int) else (float,)):
            try:
                return number(text)
            except ValueError:
                pass
        raise ValueError("must be a number, not %r" % text)
    if isinstance(default, (dict, list, tuple)) or (default is None and text[:1] in "[{"):
        if not isinstance(default, dict) and text[:1] not in "[{":
            return text
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError("is not valid JSON (%s): %r" % (e, text))
        if isinstance(default, dict) and not isinstance(value, dict):
            raise ValueError("must be a JSON object {...}, not %r" % text)
        return value
    return text


def format_value(value):
    """An option value as config text (the reverse of convert_value)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "%g" % value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def parse_ini(text, where):
    """[(section, line, [(key, value, line)])] of INI text; '#'/';' comment lines, indented continuations."""
    sections, current, continued = [], None, False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if raw[:1] in " \t" and continued:
            key, value, at = current[2][-1]
            current[2][-1] = (key, value + "\n" + line, at)
            continue
        place = "%s, line %d" % (where, number)
        continued = False
        if line.startswith("["):
            if not line.endswith("]") or not line[1:-1].strip():
                raise ConfigError(place, "a section header looks like [name], not %r" % line)
            name = line[1:-1].strip().lower()
            if any(section[0] == name for section in sections):
                raise ConfigError(place, "section [%s] appears twice" % name)
            current = (name, number, [])
            sections.append(current)
            continue
        match = re.match(r"([^=:]+?)\s*[=:]\s*(.*)$", line)
        if not match:
            raise ConfigError(place, "expected 'option = value', not %r" % line)
        if current is None:
            raise ConfigError(place, "option %r comes before any [section]" % match.group(1))
        key = match.group(1).strip().lower().replace("-", "_")
        if any(k == key for k, _, _ in current[2]):
            raise ConfigError(place, "option %r appears twice in [%s]" % (key, current[0]))
        current[2].append((key, match.group(2), number))
        continued = True
    return sections


class Settings(object):
    """What main() runs: client options, main()'s own options, and the plugins to load with theirs."""

    def __init__(self, plugins=DEFAULT_PLUGINS):
        self.options = {}
        self.main = dict(option_defaults(MAIN_OPTIONS))
        self.plugins = collections.OrderedDict((name, {}) for name in plugins)
        self.path = None
        self._tables = {}

    def table(self, section, where):
        """The option table of a section ([webqq] or a plugin's); ConfigError for a plugin that can't load."""
        if section == "webqq":
            return top_options()
        if section not in self._tables:
            try:
                self._tables[section] = plugin_options(section)
            except NoPlugin as e:
                raise ConfigError(where, "[%s] is not a plugin webqq can load (%s)" % (section, e.hint))
            except Exception as e:
                raise ConfigError(where, "[%s] is not a plugin webqq can load (%s)" % (section, e))
        return self._tables[section]

    def set(self, section, key, text, where):
        """Set one option from text; ConfigError naming where for an unknown key, a value of the wrong
        type, or one the option's check refuses."""
        table = self.table(section, where)
        if key not in table:
            raise ConfigError(where, "unknown option %r in [%s]%s" % (key, section, did_you_mean(key, table)))
        default = table[key][0]
        try:
            value = default if text.strip() == "" else check_option(key, table[key], convert_value(text, default))
        except OptionError as e:
            raise ConfigError(where, str(e))
        except ValueError as e:
            raise ConfigError(where, "%s %s" % (key, e))
        if section == "webqq":
            (self.main if key in MAIN_OPTIONS else self.options)[key] = value
        else:
            self.plugins.setdefault(section, {})[key] = value

    def read(self, path):
        """Replace the plugin list and set the options of an INI file (a UTF-8 BOM is fine)."""
        where = path
        try:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(where, "not UTF-8 text (%s): save it as UTF-8" % e)
        except OSError as e:
            raise ConfigError(where, "cannot read it (%s)" % e.strerror)
        self.path = path
        self.plugins = collections.OrderedDict()
        for section, line, items in parse_ini(text, where):
            if section != "webqq":
                self.table(section, "%s, line %d" % (where, line))
                self.plugins.setdefault(section, {})
            for key, value, number in items:
                self.set(section, key, value, "%s, line %d" % (where, number))

    def read_environment(self, environ):
        """WEBQQ_<OPTION> and WEBQQ_<PLUGIN>_<OPTION> variables; other WEBQQ_* names are not ours."""
        top = top_options()
        plugins = list(self.plugins) + [p for p in DEFAULT_PLUGINS + OPTIONAL_PLUGINS if p not in self.plugins]
        for var in sorted(environ):
            if not var.upper().startswith(ENV_PREFIX):
                continue
            name, where = var[len(ENV_PREFIX):].lower(), "environment variable " + var
            if name in top:
                self.set("webqq", name, environ[var], where)
                continue
            for plugin in plugins:
                key = name[len(plugin) + 1:]
                if name.startswith(plugin + "_") and key:
                    self.set(plugin, key, environ[var], where)
                    break

    def render(self):
        """The settings as INI text (what --check-config prints)."""
        lines = ["[webqq]"]
        lines += ["%s = %s" % (k, format_value(v)) for k, v in sorted(self.options.items())]
        lines += ["%s = %s" % (k, format_value(v)) for k, v in sorted(self.main.items())]
        for name, options in self.plugins.items():
            lines += ["", "[%s]" % name]
            lines += ["%s = %s" % (k, format_value(v)) for k, v in sorted(options.items())]
        return "\n".join(lines) + "\n"


def read_config(path):
    """(options, [(plugin, options)]) of an INI file: [webqq] options and one section per plugin."""
    settings = Settings()
    settings.read(path)
    options = dict(settings.options)
    options.update((k, v) for k, v in settings.main.items() if v != MAIN_OPTIONS[k][0])
    return options, list(settings.plugins.items())


def config_text():
    """A commented webqq.ini with every option, its default and one line of help (--init-config)."""
    out = ["# webqq.ini: the configuration of webqq, written by `python webqq.py --init-config`.",
           "#",
           "# Every option is listed with its default, commented out: remove the '#' and change the",
           "# value. An empty value means the default. Lists and objects are JSON, e.g.",
           '#     listen = [{"host": "127.0.0.1", "port": 5000}]',
           "# Environment variables WEBQQ_<OPTION> (WEBQQ_SEND_INTERVAL=1) and WEBQQ_<PLUGIN>_<OPTION>",
           "# (WEBQQ_OPENQQ_ACCESS_TOKEN=...) override this file; command-line flags override both.",
           "# Each section after [webqq] loads the plugin of that name: delete a section to leave it out,",
           "# uncomment one (the header and its lines) to add it.",
           "", "[webqq]"]
    table = top_options()
    for topic, names in option_topics():
        out += ["", "# -- %s --" % topic]
        for name in names:
            default, help_text = table[name][:2]
            out += ["# %s" % help_text, ("# %s = %s" % (name, format_value(CLI_DEFAULTS.get(name, default)))).rstrip()]
    for name in DEFAULT_PLUGINS + OPTIONAL_PLUGINS:
        on = name in DEFAULT_PLUGINS
        module = plugin_module(name)
        summary = (module.__doc__ or name).strip().splitlines()[0]
        out += ["", "", "# %s" % summary, ("[%s]" if on else "# [%s]") % name]
        for key, entry in plugin_options(name).items():
            prefix = "# " if on else "# # "
            out += [prefix + entry[1], ("# %s = %s" % (key, format_value(entry[0]))).rstrip()]
    return "\n".join(out) + "\n"


def option_topics():
    """[(topic, [option names])] of the [webqq] options, every option once."""
    table, seen, topics = top_options(), set(), []
    for topic, names in TOPICS:
        names = [name for name in names.split() if name in table]
        seen.update(names)
        topics.append((topic, names))
    rest = [name for name in table if name not in seen]
    if rest:
        topics.append(("other options", rest))
    return topics


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, saying which flag was meant when one is misspelt."""

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (-\S+)", message)
        if unknown:
            flags = [flag for action in self._actions for flag in action.option_strings]
            message += did_you_mean(unknown.group(1).partition("=")[0], flags)
        argparse.ArgumentParser.error(self, message)


def build_parser():
    """The command line: flags grouped by topic; every [webqq] option has one (--send-interval 1)."""
    parser = ArgumentParser(
        prog="webqq", allow_abbrev=False, usage="%(prog)s [-c FILE] [--demo] [--init-config [PATH]] [options]",
        description="A QQ client serving the Openqq HTTP API of Mojo-Webqq. Settings come from webqq.ini "
                    "(next to webqq.py, or -c FILE), then WEBQQ_<OPTION> environment variables, then these flags.",
        epilog="The multi-account Controller API: %(prog)s controller --help")
    parser.add_argument("--version", action="version", version="webqq " + __version__)
    start = parser.add_argument_group("start and configuration")
    start.add_argument("--demo", action="store_true",
                       help="run against the built-in simulator (QR scanned automatically)")
    start.add_argument("-c", "--config", metavar="FILE",
                       help="INI file (default: %s in the current folder or next to webqq.py)" % CONFIG_NAME)
    start.add_argument("--init-config", nargs="?", const=CONFIG_NAME, metavar="PATH",
                       help="write a commented %s with every option and exit (PATH - for standard output)"
                            % CONFIG_NAME)
    start.add_argument("--check-config", action="store_true",
                       help="print the settings from every source and exit (errors exit with status 2)")
    start.add_argument("-o", "--option", action="append", default=[], metavar="[SECTION.]KEY=VALUE",
                       help="set any option, e.g. -o openqq.post_secret=s3cret (section default: webqq)")
    api = parser.add_argument_group("Openqq API and web console")
    api.add_argument("--listen", action="append", metavar="HOST:PORT", help="API address (default 127.0.0.1:5000)")
    api.add_argument("--post-api", metavar="URL", help="POST every message and event to this URL")
    api.add_argument("--access-token", metavar="TOKEN", help="require this token on every API request")
    api.add_argument("--no-openqq", action="store_true", help="do not serve the Openqq API (nor the web console)")
    api.add_argument("--no-console", action="store_true", help="do not serve the web console at /console/")
    table = top_options()
    for topic, names in option_topics():
        group = parser.add_argument_group(topic)
        for name in names:
            default, help_text = table[name][:2]
            default = CLI_DEFAULTS.get(name, default)
            shown = format_value(default)
            kwargs = {"help": help_text + (" (default: %s)" % shown if shown else ""), "dest": "opt_" + name}
            if isinstance(default, bool):
                kwargs.update(nargs="?", const="true", metavar="yes|no")
            else:
                kwargs["metavar"] = "N" if isinstance(default, (int, float)) else "VALUE"
            group.add_argument("--" + name.replace("_", "-"), **kwargs)
    return parser


def load_settings(args, environ):
    """Settings from the config file, then the environment, then the flags; ConfigError on a mistake."""
    settings = Settings()
    config = args.config or next((path for path in (CONFIG_NAME, os.path.join(HERE, CONFIG_NAME))
                                  if os.path.isfile(path)), None)
    if config:
        settings.read(config)
    settings.read_environment(environ)
    for name in top_options():
        text = getattr(args, "opt_" + name, None)
        if text is not None:
            settings.set("webqq", name, text, "flag --" + name.replace("_", "-"))
    for item in args.option:
        key, sep, text = item.partition("=")
        section, _, key = key.strip().lower().rpartition(".")
        if not sep or not key:
            raise ConfigError("flag -o %s" % item, "expected [SECTION.]KEY=VALUE")
        settings.set(section or "webqq", key.replace("-", "_"), text, "flag -o %s" % item)
    if args.listen:
        try:
            settings.plugins.setdefault("openqq", {})["listen"] = [parse_listen(text) for text in args.listen]
        except ValueError as e:
            raise ConfigError("flag --listen", str(e))
    for name in ("post_api", "access_token"):
        if getattr(args, name):
            settings.set("openqq", name, getattr(args, name), "flag --" + name.replace("_", "-"))
    for name, off in (("openqq", args.no_openqq), ("console", args.no_openqq or args.no_console)):
        if off:
            settings.plugins.pop(name, None)
    for name, value in CLI_DEFAULTS.items():
        settings.options.setdefault(name, value)
    return settings


def write_init_config(path, stream=None):
    """--init-config: write the commented config to path ("-": stream); the exit status."""
    text = config_text()
    if path == "-":
        (stream or sys.stdout).write(text)
        return 0
    if os.path.exists(path):
        sys.stderr.write("%s exists already: remove it first, or give another path\n" % path)
        return 1
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        sys.stderr.write("cannot write %s: %s\n" % (path, e.strerror))
        return 1
    sys.stdout.write("wrote %s: edit it, then start webqq again\n" % path)
    return 0


# -- the console window ---------------------------------------------------------


def fix_console_encoding(stream):
    """Make stream able to write any text: gb18030 on a gbk/cp936 console, escapes on other narrow ones."""
    encoding = getattr(stream, "encoding", None)
    if not encoding or not hasattr(stream, "reconfigure"):
        return stream
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return stream
    try:
        stream.flush()
        if name in ("gbk", "gb2312"):  # cp936 is gbk: gb18030 writes the same bytes, and every character
            stream.reconfigure(encoding="gb18030", errors="replace")
        elif not name.startswith(("utf", "gb18030")):
            stream.reconfigure(errors="backslashreplace")
    except (OSError, ValueError):
        pass
    return stream


def started_by_double_click():
    """True for a Windows console window that closes when webqq exits (Explorer's double-click)."""
    if os.name != "nt":
        return False
    try:
        import ctypes
        count = ctypes.windll.kernel32.GetConsoleProcessList((ctypes.c_ulong * 4)(), 4)
    except (ImportError, AttributeError, OSError):
        return False
    # Alone in the console, or with the py.exe launcher; cmd.exe (which sets PROMPT) keeps it open.
    return 0 < count <= 2 and "PROMPT" not in os.environ


def should_pause(setting, stdin=None):
    """Whether to wait for Enter after a fatal error, for pause_on_error (yes, no, auto)."""
    if yes_no(setting) is not None:
        return yes_no(setting)
    stdin = stdin or sys.stdin
    try:
        interactive = stdin is not None and stdin.isatty()
    except (AttributeError, ValueError):
        interactive = False
    return interactive and started_by_double_click()


# What to tell a person about a fatal error, by a piece of its text.
HINTS = [
    ("the address is in use", "choose a free port in that listen setting ([openqq] listen, or --listen "
                              "127.0.0.1:5001; [onebot] listen), or stop the program that holds it"),
    ("cannot listen on", "listen on an address of this machine (127.0.0.1; 0.0.0.0 for all of them), and on a port "
                         "above 1023 unless webqq may take privileged ones"),
    ("OneBot拒绝了access_token", "set access_token in [onebot] to the token of NapCat's / LLOneBot's HTTP server"),
    ("another client of account", "close the other webqq first, or give this one another account name"),
    ("expired QR codes", "start webqq again and scan the QR code with the QQ app within two minutes"),
    (", line ", "fix that line of the config file (python webqq.py --init-config writes a commented example)"),
    ("environment variable", "fix or unset that environment variable"),
    ("flag ", "fix that flag (python webqq.py --help lists them all)"),
]
DEFAULT_HINT = "see the log above; python webqq.py --help lists the options, docs/people.md explains them"


def report_fatal(message, pause, stream=None, stdin=None):
    """Tell a person webqq stopped and why; with pause, keep the window open until Enter."""
    stream, stdin = stream or sys.stderr, stdin or sys.stdin
    hint = next((hint for key, hint in HINTS if key in message), DEFAULT_HINT)
    stream.write("\n错误 (error): %s\n提示 (hint): %s\n" % (message, hint))
    stream.flush()
    if should_pause(pause, stdin):
        stream.write("按回车键关闭窗口 (press Enter to close this window) ")
        stream.flush()
        try:
            stdin.readline()
        except (OSError, ValueError, KeyboardInterrupt):
            pass


class LastError(logging.Handler):
    """Remembers the last error the webqq logger told, to repeat it when webqq stops."""

    def __init__(self):
        logging.Handler.__init__(self, logging.ERROR)
        self.message = None

    def emit(self, record):
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message += ": %s" % record.exc_info[1]
        self.message = message


class Progress(object):
    """What the client does, for a person: a line redrawn on a terminal, else a log line per step."""

    LABELS = (("friend", "好友 friends"), ("group", "群 groups"), ("discuss", "讨论组 discusses"))

    def __init__(self, client, stream=None):
        self.client, self.log = client, client.log
        self.stream = stream or sys.stderr
        self.tty = terminal_size(self.stream) is not None
        self.counts, self.shown, self.lock = {}, False, threading.Lock()
        self.handlers = [h for h in self.log.handlers if getattr(h, "stream", None) is self.stream]
        for handler in self.handlers:
            handler.addFilter(self.clear)
        client.on("state_change", self.on_state)
        client.on("progress", self.on_progress)
        client.on("stop", self.close)

    def on_state(self, old, new):
        if new == "loading":
            self.log.info("正在连接QQ (connecting to QQ)...")
        elif new == "updating" and old != "running":     # from running: a relogin, told as such
            self.counts = {}
            self.log.info("正在加载联系人 (logged in, loading the contacts)...")

    def on_progress(self, step, done, total):
        self.counts[step] = (done, total)
        if self.tty:  # the line is redrawn until its last step, then kept
            with self.lock:
                self.stream.write("\r%s\x1b[K" % self.line(step))
                self.shown = step != "discuss" and not (step == "member" and done == total)
                if not self.shown:
                    self.stream.write("\n")
                self.stream.flush()
        elif step != "member":
            self.log.info("已加载 (loaded): %d %s", done, dict(self.LABELS)[step].split()[1])
        elif done == total or done * 4 // total > (done - 1) * 4 // total:
            self.log.info("已加载群成员 (members loaded): %d/%d groups, %d members", done, total, self.members())

    def members(self):
        return sum(len(group.members) for group in self.client.contacts.groups() if group.members_loaded)

    def line(self, step):
        if step == "member":
            return "加载群成员 loading members: %d/%d groups, %d members" % (self.counts[step] + (self.members(),))
        parts = ["%s %d" % (label, self.counts[kind][0]) for kind, label in self.LABELS if kind in self.counts]
        return "加载联系人 loading contacts: " + " | ".join(parts)

    def clear(self, record):
        """Logging filter: wipe the progress line before a log line is written over it."""
        with self.lock:
            if self.shown:
                self.stream.write("\r\x1b[K")
                self.shown = False
        return True

    def close(self):
        for handler in self.handlers:
            handler.removeFilter(self.clear)


# -- running --------------------------------------------------------------------


class Runner(object):
    """Runs a client with the settings; with restart on, a new one after each error stop, with backoff."""

    def __init__(self, settings):
        self.settings = settings
        self.client = None
        self.log = logging.getLogger("webqq")
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def make_client(self):
        """(client, ok): a client with the plugins loaded (openqq before console); ok is False if one failed."""
        client = Client(**self.settings.options)
        Progress(client)
        plugins = sorted(self.settings.plugins.items(), key=lambda item: item[0] == "console")
        for name, options in plugins:
            if client.load(name, **options) is None:  # the reason is logged: LastError repeats it
                client.stop_after_failed_load()
                return client, False
        return client, True

    def run(self):
        """Run clients until one stops with status 0, or restarts are off, or stop() was called."""
        main = self.settings.main
        delay = float(main["restart_delay"])
        while True:
            client, ok = self.make_client()
            with self._lock:
                self.client = client
            started = time.time()
            if self._stop.is_set():
                client.stop()
            status = client.run() if ok and not self._stop.is_set() else client.exit_status
            if status == 0 or not main["restart"] or self._stop.is_set():
                return status
            if time.time() - started > 600:
                delay = float(main["restart_delay"])
            self.log.warning("客户端异常停止，%g秒后重新启动 (restarting in %g s)", delay, delay)
            if self._stop.wait(delay):
                return status
            delay = min(delay * 2, float(main["restart_delay_max"]))

    def stop(self):
        """Stop the current client and start no other; returns when it has stopped."""
        self._stop.set()
        with self._lock:
            client = self.client
        if client is not None:
            client.stop(reason="terminated")


def load_simulator():
    """The SmartQQ simulator module (scripts/smartqq_sim.py, installed as webqq_scripts.smartqq_sim)."""
    return importlib.import_module("webqq_scripts.smartqq_sim")


DEMO_LINES = ("早上好！今天的会议改到下午三点", "有人知道 webqq 的 check_event 怎么用吗？", "看 docs/openqq.md [微笑]",
              "周末去爬山吗？", "收到，三点见", "这个 bug 修好了吗 [疑问]", "晚上一起吃饭？", "[强] 厉害")


class Demo(object):
    """The demo world: the simulator in-process, scanning the QR by itself, and a few chatty friends."""

    def __init__(self, options):
        module = load_simulator()
        self.sim = module.Simulator(auto_scan=2.0, poll_hold=20.0).start()
        self._stop = threading.Event()
        self._thread = Thread("webqq-demo-chatter", self._chatter)
        self._thread.start()
        options.setdefault("account", "demo")
        options.update(smartqq_base=self.sim.url, qr_check_interval=1.0)
        options.setdefault("send_interval", 1.0)
        log = configure_logging(options.get("log_level", "info"), options.get("log_path"))
        log.info("demo: 模拟的QQ服务 (the simulated QQ service) runs at %s; it scans the QR code by itself",
                 self.sim.url)

    def _chatter(self):
        rng, world = random.Random(), self.sim.world
        while not self._stop.wait(rng.uniform(6, 12)):
            line = rng.choice(DEMO_LINES)
            if rng.random() < 0.5 and world.friends:
                self.sim.inject_friend_message(rng.choice(world.friends).uin, line)
            elif world.groups:
                group = rng.choice(world.groups)
                members = [m for m in group.members if m.uin != world.user.uin]
                if members:
                    self.sim.inject_group_message(group.gid, rng.choice(members).uin, line)

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sim.stop()


def main(argv=None):
    """The command line: config file, then WEBQQ_* variables, then flags; runs until stopped; the exit status."""
    for stream in (sys.stdout, sys.stderr):
        fix_console_encoding(stream)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["controller"], ["--controller"]):   # the multi-account Controller API
        return plugin_module("controller").main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.init_config is not None:
        return write_init_config(args.init_config)
    pause = args.opt_pause_on_error or os.environ.get(ENV_PREFIX + "PAUSE_ON_ERROR") or "auto"
    try:
        settings = load_settings(args, os.environ)
    except ConfigError as e:
        report_fatal(str(e), pause)
        return 2
    if args.check_config:
        sys.stdout.write(settings.render())
        return 0
    last_error = LastError()
    logging.getLogger("webqq").addHandler(last_error)
    runner, demo = Runner(settings), None
    try:
        import signal
        signal.signal(signal.SIGTERM, lambda *_: Thread("webqq-signal", runner.stop).start())
    except (ImportError, ValueError, AttributeError):
        pass
    try:
        if args.demo:
            demo = Demo(settings.options)
        status = runner.run()
    except KeyboardInterrupt:
        runner.stop()
        status = 0
    except (ValueError, TypeError, OSError) as e:
        status, last_error.message = 2 if isinstance(e, BindError) else 1, str(e)
    finally:
        logging.getLogger("webqq").removeHandler(last_error)
        if demo is not None:
            demo.stop()
    if status:
        report_fatal(last_error.message or "webqq stopped with status %d" % status, settings.main["pause_on_error"])
    return status


map_checkout_folders()

if __name__ == "__main__":
    sys.exit(main())
