"""For people: the terminal QR, console encodings, the config file, the command line, progress, restarts."""
import io
import logging
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest

import webqq
from conftest import ROOT, LogLines, log_in, png_chunk, scan_and_confirm, wait_until

# The QR code of "webqq" (version 1, level M), row by row: '#' is a dark module.
WEBQQ_QR = [
    "#######..##...#######",
    "#.....#...#.#.#.....#",
    "#.###.#.#...#.#.###.#",
    "#.###.#.#.#...#.###.#",
    "#.###.#.##..#.#.###.#",
    "#.....#.#.##..#.....#",
    "#######.#.#.#.#######",
    "........##...........",
    "#.#####....#..#####..",
    ".#.#...##.#####..##.#",
    "#..##.#.###.#.##.###.",
    ".##..#..#######..####",
    "..##..##.##.#..#...#.",
    "........##..#..#..###",
    "#######..###.#..#..#.",
    "#.....#.#......#####.",
    "#.###.#.##.#.#..##.#.",
    "#.###.#.#.######..#..",
    "#.###.#.#.#.#.##.##..",
    "#.....#...#####..##..",
    "#######.#.#.#..#.#.#.",
]

HALF_BLOCKS = """
█████████████████████████
██ ▄▄▄▄▄ ██▄ █▀█ ▄▄▄▄▄ ██
██ █   █ █ █▀█▄█ █   █ ██
██ █▄▄▄█ █ ▄▀▀▄█ █▄▄▄█ ██
██▄▄▄▄▄▄▄█ ▀▄█▄█▄▄▄▄▄▄▄██
██▄▀▄ ▄▄▄▀▀█▀ ▀▀ ▄▄  █▀██
██▄▀▀▄▄▀▄█   ▀ ▀ ▄█   ▀██
████▄▄██▄▄▀ ▄█ ██ ██▀ ▀██
██ ▄▄▄▄▄ █▀▄▄▄█▄█▀ ▀▀ ███
██ █   █ █ ▄▀ ▀ ▀▀▄▄▀▄███
██ █▄▄▄█ █▄█ ▀ ▀ ▄█  ████
██▄▄▄▄▄▄▄█▄█▄█▄██▄█▄█▄███
▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀▀
"""


def qr_png(rows, scale=3, quiet=2, palette=False):
    """The PNG ptqrshow serves for a QR matrix: scale pixels per module, quiet modules of margin.

    Rows are filtered with Sub (1), Up (2) and Paeth (4) in turn; palette makes it a 1-bit indexed PNG.
    """
    size = (len(rows) + 2 * quiet) * scale
    dark = [[False] * size for _ in range(size)]
    for j, row in enumerate(rows):
        for i, cell in enumerate(row):
            for y in range((j + quiet) * scale, (j + quiet + 1) * scale):
                for x in range((i + quiet) * scale, (i + quiet + 1) * scale):
                    dark[y][x] = cell == "#"
    raw, prev = b"", bytes(size)
    for y, line in enumerate(dark):
        if palette:
            bits = "".join("0" if d else "1" for d in line).ljust((size + 7) // 8 * 8, "0")
            raw += b"\x00" + bytes(int(bits[k:k + 8], 2) for k in range(0, len(bits), 8))
            continue
        pixels = bytes(0 if d else 255 for d in line)
        kind = (1, 2, 4)[y % 3]
        if kind == 1:
            out = bytes((pixels[x] - (pixels[x - 1] if x else 0)) & 0xFF for x in range(size))
        elif kind == 2:
            out = bytes((pixels[x] - prev[x]) & 0xFF for x in range(size))
        else:
            def paeth(a, b, c):
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                return a if pa <= pb and pa <= pc else b if pb <= pc else c
            out = bytes((pixels[x] - paeth(pixels[x - 1] if x else 0, prev[x], prev[x - 1] if x else 0)) & 0xFF
                        for x in range(size))
        raw += bytes([kind]) + out
        prev = pixels

    header = struct.pack(">IIBBBBB", size, size, 1 if palette else 8, 3 if palette else 0, 0, 0, 0)
    plte = png_chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff") if palette else b""
    return (webqq.PNG_SIGNATURE + png_chunk(b"IHDR", header) + plte + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def utf8_stream():
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="\n")


def written(stream):
    stream.flush()
    return stream.buffer.getvalue().decode(stream.encoding)


# -- the terminal QR ---------------------------------------------------------------------

@pytest.mark.parametrize("palette", [False, True])
def test_terminal_drawing_of_a_known_png_is_exact(palette):
    png = qr_png(WEBQQ_QR, palette=palette)
    assert webqq.qr_matrix(png) == [[c == "#" for c in row] for row in WEBQQ_QR]
    out = utf8_stream()
    webqq.show_qrcode_in_terminal("/tmp/qr.png", png, out)
    assert written(out) == HALF_BLOCKS


def test_a_console_that_cannot_encode_blocks_gets_at_pairs():
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", newline="\n")
    webqq.show_qrcode_in_terminal("/tmp/qr.png", qr_png(WEBQQ_QR), out)
    lines = written(out).split("\n")
    assert lines[0] == "" and lines[1] == lines[2] == "@@" * 25
    assert lines[3] == "@@@@" + "".join("  " if c == "#" else "@@" for c in WEBQQ_QR[0]) + "@@@@"
    assert len(lines) == 1 + 25 + 1 and lines[-1] == ""


def test_the_drawing_shrinks_its_margin_to_fit_and_says_when_it_cannot():
    matrix = [[c == "#" for c in row] for row in WEBQQ_QR]
    text, fits = webqq.fit_qrcode(matrix, False, (25, 14))
    assert fits and text == webqq.draw_qrcode(matrix, quiet=2)          # 25 x 13 fits
    text, fits = webqq.fit_qrcode(matrix, False, (24, 14))
    assert fits and text == webqq.draw_qrcode(matrix, quiet=1)          # 23 x 12
    text, fits = webqq.fit_qrcode(matrix, True, (80, 24))
    assert fits and text == webqq.draw_qrcode(matrix, ascii=True, quiet=1)   # 46 x 23
    text, fits = webqq.fit_qrcode(matrix, True, (80, 23))
    assert not fits and text == webqq.draw_qrcode(matrix, ascii=True)        # too tall: drawn whole
    assert webqq.text_size(webqq.draw_qrcode(matrix, color=True)) == (25, 13)


needs_pty = pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals here")


@needs_pty
def test_a_pty_gets_white_on_black_and_a_warning_when_too_small(tmp_path):
    master, slave = os.openpty()
    warnings = LogLines(logging.WARNING)
    try:
        with open(slave, "w", encoding="utf-8") as tty:
            if webqq.terminal_size(tty) is None:
                pytest.skip("this pty reports no size")
            webqq.show_qrcode_in_terminal(str(tmp_path / "qr.png"), qr_png(WEBQQ_QR), tty)
        text = os.read(master, 65536).decode("utf-8")
    finally:
        warnings.close()
        os.close(master)
    assert text.replace("\r\n", "\n") == "\n" + "".join(
        webqq.ANSI_QR + line + webqq.ANSI_RESET + "\n" for line in HALF_BLOCKS.strip("\n").split("\n"))
    assert "the QR code needs 25x13 characters, the window has 0x0" in warnings.lines[0]


def test_file_display_prints_a_file_link(tmp_path):
    out = io.StringIO()
    webqq.print_qrcode_path(str(tmp_path / "二维码 1.png"), b"", out)
    assert out.getvalue() == "二维码 (QR code): file://%s/%%E4%%BA%%8C%%E7%%BB%%B4%%E7%%A0%%81%%201.png\n" % tmp_path


def test_each_qr_display_mode_is_logged_when_it_is_on(make_client, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(ValueError, match="qrcode_display must name terminal, file, viewer, console, email or none "
                                         r"\(comma-separated\), not 'bogus'"):
        make_client(qrcode_display="terminal,bogus")
    client = make_client(qrcode_display="terminal, file,viewer,email,console")
    infos = LogLines(logging.INFO)
    try:
        webqq.start_qr_displays(client)
    finally:
        infos.close()
    assert infos.lines == [
        "二维码显示方式 (QR display): terminal (drawn in this window)",
        "二维码显示方式 (QR display): file (its path printed)",
        "二维码显示方式 viewer: 没有桌面，不打开图片 (QR display viewer is off: no desktop)",
        "二维码显示方式 email 需要插件 qrmail (QR display email needs the qrmail plugin: add a [qrmail] section)",
        "二维码显示方式 console 需要插件 console (QR display console needs the console plugin: "
        "add a [console] section)"]
    out = utf8_stream()
    monkeypatch.setattr(sys, "stdout", out)
    client.emit("input_qrcode", "/tmp/qr.png", qr_png(WEBQQ_QR))
    assert written(out) == HALF_BLOCKS + "二维码 (QR code): file:///tmp/qr.png\n"


# -- console encodings ---------------------------------------------------------------------

def test_a_gbk_console_writes_any_text_without_mojibake():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="gbk", newline="\n")
    with pytest.raises(UnicodeEncodeError):
        stream.write("✓ 😀")
    stream = io.TextIOWrapper(io.BytesIO(), encoding="cp936", newline="\n")
    assert webqq.fix_console_encoding(stream) is stream
    logger = logging.getLogger("webqq.test-gbk")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        logger.warning("登录成功 ✓ 😀 ▀ naïve")
    finally:
        logger.removeHandler(handler)
    raw = stream.buffer.getvalue()
    assert raw.decode("gb18030") == "登录成功 ✓ 😀 ▀ naïve\n"
    assert raw.startswith("登录成功 ".encode("gbk"))           # what a gbk console shows is right
    out = io.TextIOWrapper(io.BytesIO(), encoding="gbk", newline="\n")
    webqq.fix_console_encoding(out)
    webqq.show_qrcode_in_terminal("/tmp/qr.png", qr_png(WEBQQ_QR), out)
    assert set(written(out)) == {"@", " ", "\n"}                 # blocks are two columns wide there


def test_narrow_consoles_escape_instead_of_crashing():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii", newline="\n")
    webqq.fix_console_encoding(stream)
    stream.write("你好")
    assert written(stream) == "\\u4f60\\u597d"
    utf8 = utf8_stream()
    webqq.fix_console_encoding(utf8)
    assert (utf8.encoding, utf8.errors) == ("utf-8", "strict")


# -- the config file ---------------------------------------------------------------------

def settings_from(tmp_path, text, environ=None, argv=(), bom=False):
    path = tmp_path / "webqq.ini"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    args = webqq.build_parser().parse_args(["-c", str(path)] + list(argv))
    return webqq.load_settings(args, environ or {})


@pytest.mark.parametrize("text, error", [
    ("[webqq]\naccount = a\nsendinterval = 1\n",
     "webqq.ini, line 3: unknown option 'sendinterval' in [webqq] (did you mean 'send_interval'?)"),
    ("[webqq]\n\nsend_interval = fast\n", "webqq.ini, line 3: send_interval must be a number, not 'fast'"),
    ("[webqq]\nkeep_cookie = maybe\n", "webqq.ini, line 2: keep_cookie must be true or false, not 'maybe'"),
    ("[webqq]\nmsg_ttl = 3x\n", "webqq.ini, line 2: msg_ttl must be a number, not '3x'"),
    ("[webqq]\nupstream_options = [1]\n",
     "webqq.ini, line 2: upstream_options must be a JSON object {...}, not '[1]'"),
    ("[openqq]\nlisten = [{\"port\": 5000\n", "webqq.ini, line 2: listen is not valid JSON"),
    ("[openqq]\n# a comment\nrequest_timeout = soon\n",
     "webqq.ini, line 3: request_timeout must be a number, not 'soon'"),
    ("[openqq]\npost_apii = http://x\n",
     "webqq.ini, line 2: unknown option 'post_apii' in [openqq] (did you mean 'post_api'?)"),
    ("[openqq]\nauth = x\n", "webqq.ini, line 2: unknown option 'auth' in [openqq]"),
    ("[showmsg]\nallow_groups = a\n",
     "webqq.ini, line 2: unknown option 'allow_groups' in [showmsg] (did you mean 'allow_group'?)"),
    ("[webqq]\n\n[no_such_plugin]\n", "webqq.ini, line 3: [no_such_plugin] is not a plugin webqq can load"),
    ("account = a\n", "webqq.ini, line 1: option 'account' comes before any [section]"),
    ("[webqq]\naccount\n", "webqq.ini, line 2: expected 'option = value', not 'account'"),
    ("[webqq]\naccount = a\nAccount = b\n", "webqq.ini, line 3: option 'account' appears twice in [webqq]"),
    ("[webqq]\n[webqq]\n", "webqq.ini, line 2: section [webqq] appears twice"),
    ("[webqq\n", "webqq.ini, line 1: a section header looks like [name], not '[webqq'"),
    ("[webqq]\nrelogin_at = 25:00\n", None),
])
def test_config_errors_name_the_key_and_the_line(tmp_path, text, error):
    if error is None:
        settings = settings_from(tmp_path, text)     # relogin_at is checked by the client itself
        with pytest.raises(ValueError, match="relogin_at must be a time of day HH:MM, not '25:00'"):
            webqq.Client(**settings.options)
        return
    with pytest.raises(webqq.ConfigError) as info:
        settings_from(tmp_path, text)
    assert str(info.value).startswith(str(tmp_path / error.split(",")[0]) + "," + error.split(",", 1)[1])


def test_config_forms_bom_json_continuations_and_plugins(tmp_path):
    settings = settings_from(tmp_path, (
        "; the Controller's form\n"
        "[webqq]\n"
        "Account = 客户1\n"
        "send-interval: 0.5\n"
        "keep_cookie = no\n"
        "upstream_options = {\"url\": \"ws://127.0.0.1:1\"}\n"
        "log_path =\n"
        "restart = yes\n"
        "\n"
        "[openqq]\n"
        "listen = [{\"host\": \"127.0.0.1\", \"port\": 5001},\n"
        "         {\"host\": \"::1\", \"port\": 5001}]\n"
        "post_api = http://127.0.0.1:8000/post#frag\n"
        "post_event = off\n"
        "post_event_list = login, stop\n"
        "request_timeout = 2.5\n"
        "\n"
        "[ShowMsg]\n"
        "ban_group = spam\n"), bom=True)
    assert settings.options == {"account": "客户1", "send_interval": 0.5, "keep_cookie": False,
                                "upstream_options": {"url": "ws://127.0.0.1:1"}, "log_path": None,
                                "qrcode_display": "terminal,viewer"}
    assert settings.main["restart"] is True and settings.main["restart_delay"] == 5.0
    assert list(settings.plugins) == ["openqq", "showmsg"]
    assert settings.plugins["openqq"] == {
        "listen": [{"host": "127.0.0.1", "port": 5001}, {"host": "::1", "port": 5001}],
        "post_api": "http://127.0.0.1:8000/post#frag", "post_event": False, "post_event_list": "login, stop",
        "request_timeout": 2.5}
    assert settings.plugins["showmsg"] == {"ban_group": "spam"}
    options, plugins = webqq.read_config(str(tmp_path / "webqq.ini"))
    assert options["account"] == "客户1" and options["restart"] is True and plugins[1] == ("showmsg", {
        "ban_group": "spam"})


def test_precedence_file_then_environment_then_flags(tmp_path):
    text = "[webqq]\naccount = from-file\nsend_interval = 1\nlog_level = warn\n[openqq]\npost_api = http://file/\n"
    environ = {"WEBQQ_SEND_INTERVAL": "2", "WEBQQ_LOG_LEVEL": "debug", "WEBQQ_OPENQQ_POST_API": "http://env/",
               "WEBQQ_OPENQQ_ACCESS_TOKEN": "env-token", "WEBQQ_CI_VENV": "/not/ours", "PATH": "/bin"}
    settings = settings_from(tmp_path, text)
    assert (settings.options["account"], settings.options["send_interval"]) == ("from-file", 1.0)
    settings = settings_from(tmp_path, text, environ)
    assert (settings.options["account"], settings.options["send_interval"], settings.options["log_level"]) == (
        "from-file", 2.0, "debug")
    assert settings.plugins["openqq"] == {"post_api": "http://env/", "access_token": "env-token"}
    settings = settings_from(tmp_path, text, environ, ["--send-interval", "3", "-o", "openqq.post_api=http://flag/",
                                                       "-o", "log_level=error", "--restart"])
    assert (settings.options["send_interval"], settings.options["log_level"], settings.main["restart"]) == (
        3.0, "error", True)
    assert settings.plugins["openqq"]["post_api"] == "http://flag/"
    settings = settings_from(tmp_path, text, environ, ["--post-api", "http://short/", "--listen", "[::1]:7000"])
    assert settings.plugins["openqq"]["post_api"] == "http://short/"
    assert settings.plugins["openqq"]["listen"] == [{"host": "::1", "port": 7000}]
    settings = settings_from(tmp_path, "[webqq]\n", {"WEBQQ_QRMAIL_HOST": "smtp.example.com"})
    assert settings.plugins["qrmail"] == {"host": "smtp.example.com"}


@pytest.mark.parametrize("environ, argv, error", [
    ({"WEBQQ_SEND_INTERVAL": "soon"}, [], "environment variable WEBQQ_SEND_INTERVAL: send_interval must be a number"),
    ({"WEBQQ_OPENQQ_POST_EVENT": "perhaps"}, [],
     "environment variable WEBQQ_OPENQQ_POST_EVENT: post_event must be true or false"),
    ({}, ["--keep-cookie", "sometimes"], "flag --keep-cookie: keep_cookie must be true or false, not 'sometimes'"),
    ({}, ["-o", "openqq.nope=1"], "flag -o openqq.nope=1: unknown option 'nope' in [openqq]"),
    ({}, ["-o", "novalue"], "flag -o novalue: expected [SECTION.]KEY=VALUE"),
    ({}, ["--listen", "localhost"], "flag --listen: listen address 'localhost' is not host:port"),
])
def test_environment_and_flag_errors_name_them(tmp_path, environ, argv, error):
    with pytest.raises(webqq.ConfigError) as info:
        settings_from(tmp_path, "[webqq]\n[openqq]\n", environ, argv)
    assert str(info.value).startswith(error)


def test_defaults_without_a_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(webqq, "HERE", str(tmp_path))
    settings = webqq.load_settings(webqq.build_parser().parse_args([]), {})
    assert list(settings.plugins) == ["showmsg", "openqq", "console"]
    assert settings.options == {"qrcode_display": "terminal,viewer"} and settings.path is None
    (tmp_path / "webqq.ini").write_text("[webqq]\naccount = next-to-it\n[openqq]\n", encoding="utf-8")
    settings = webqq.load_settings(webqq.build_parser().parse_args(["--no-console"]), {})
    assert settings.options["account"] == "next-to-it" and list(settings.plugins) == ["openqq"]


def uncomment(text):
    """The written config with every option line of the sections in use uncommented."""
    out, active = [], False
    for line in text.splitlines():
        if line.startswith("["):
            active = True
        elif line.startswith("# ["):
            active = False
        match = re.match(r"^# ([a-z_]+) =(.*)$", line)
        out.append("%s =%s" % match.groups() if match and active else line)
    return "\n".join(out) + "\n"


def test_init_config_round_trip(tmp_path):
    path = tmp_path / "webqq.ini"
    assert webqq.main(["--init-config", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert "# seconds between two sends\n# send_interval = 3\n" in text
    assert "# where to show the QR" in text and "# qrcode_display = terminal,viewer\n" in text
    assert "[openqq]\n" in text and "# [qrmail]\n" in text and "# # SMTP server, e.g. smtp.qq.com" in text
    written_settings = webqq.Settings()
    written_settings.read(str(path))
    defaults = webqq.Settings()
    assert written_settings.options == {} and list(written_settings.plugins) == list(defaults.plugins)
    assert all(options == {} for options in written_settings.plugins.values())
    path.write_text(uncomment(text), encoding="utf-8")
    full = webqq.Settings()
    full.read(str(path))
    expected = dict(webqq.option_defaults(webqq.Client.OPTIONS))
    expected.update(webqq.CLI_DEFAULTS)
    assert full.options == expected and full.main == defaults.main
    from webqq_plugins import openqq
    assert set(full.plugins["openqq"]) == set(openqq.OPTIONS) - {"auth"}
    for name, value in full.plugins["openqq"].items():
        default = openqq.OPTIONS[name][0]
        assert value == (list(default) if isinstance(default, tuple) else default), name
    assert full.plugins["showmsg"] == {"allow_group": None, "ban_group": None}
    assert webqq.main(["--init-config", str(path)]) == 1           # never overwrites


def run_webqq(args, env=None, stdin=None, timeout=30):
    environ = dict(os.environ, PYTHONIOENCODING="utf-8", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "webqq.py")] + args, input=stdin, env=environ,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


def test_check_config_prints_what_every_source_says(tmp_path):
    path = tmp_path / "webqq.ini"
    path.write_bytes(b"\xef\xbb\xbf[webqq]\naccount = a1\nsend_interval = 1\n[openqq]\nlisten = 127.0.0.1:0\n")
    done = run_webqq(["-c", str(path), "--check-config", "--send-interval", "4"], {"WEBQQ_ACCOUNT": "a2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode("utf-8") == (
        "[webqq]\naccount = a2\nqrcode_display = terminal,viewer\nsend_interval = 4\n"
        "pause_on_error = auto\nrestart = false\nrestart_delay = 5\nrestart_delay_max = 300\n"
        "\n[openqq]\nlisten = 127.0.0.1:0\n")


def test_a_fatal_error_shows_a_hint_and_waits_for_enter_only_when_asked(tmp_path):
    path = tmp_path / "webqq.ini"
    path.write_text("[webqq]\nsend_interval = fast\n", encoding="utf-8")
    done = run_webqq(["-c", str(path)], stdin=b"\n")
    err = done.stderr.decode("utf-8")
    assert done.returncode == 2
    assert "错误 (error): %s, line 2: send_interval must be a number, not 'fast'\n" % path in err
    assert "提示 (hint): fix that line of the config file (python webqq.py --init-config" in err
    assert "press Enter" not in err                                   # a pipe: never waits
    started = time.time()
    command = [sys.executable, os.path.join(ROOT, "webqq.py"), "-c", str(path), "--pause-on-error", "yes"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    shown, hint = b"", "提示 (hint):".encode("utf-8")
    while hint not in shown or b"\n" not in shown.split(hint)[1]:    # up to the hint, just before the pause
        chunk = os.read(proc.stderr.fileno(), 4096)                   # unbuffered: communicate() reads the rest
        if not chunk:
            break
        shown += chunk
    time.sleep(0.3)
    assert proc.poll() is None                                         # waiting for Enter
    out, err = proc.communicate(b"\n", timeout=10)
    err = shown + err
    assert proc.returncode == 2 and "按回车键关闭窗口 (press Enter to close this window)" in err.decode("utf-8")
    assert time.time() - started < 10


def test_should_pause_only_on_a_closing_windows_console(monkeypatch):
    class Tty(object):
        def isatty(self):
            return True
    assert webqq.should_pause("yes") and not webqq.should_pause("no")
    assert not webqq.should_pause("auto", Tty())                       # not Windows
    monkeypatch.setattr(webqq, "started_by_double_click", lambda: True)
    assert webqq.should_pause("auto", Tty()) and not webqq.should_pause("auto", io.StringIO())


# -- progress, daily relogin, restarts ---------------------------------------------------------

def test_progress_is_a_log_line_per_step_off_a_terminal(sim, make_client):
    client = make_client()
    infos = LogLines(logging.INFO)
    try:
        webqq.Progress(client, io.StringIO())
        log_in(sim, client)
        wait_until(lambda: any("2/2 groups" in line for line in infos.lines))
    finally:
        infos.close()
    steps = [line for line in infos.lines if line.startswith(("正在", "已加载", "请使用"))]
    members = sum(len(g.members) for g in sim.world.groups)
    assert steps == ["正在连接QQ (connecting to QQ)...",
                     "请使用手机QQ扫描二维码 (scan the QR code with the QQ app): %s" % client.qrcode_path,
                     "正在加载联系人 (logged in, loading the contacts)...",
                     "已加载 (loaded): 6 friends", "已加载 (loaded): 2 groups", "已加载 (loaded): 1 discusses",
                     "已加载群成员 (members loaded): 1/2 groups, %d members" % len(sim.world.groups[0].members),
                     "已加载群成员 (members loaded): 2/2 groups, %d members" % members]


def read_all(fd, chunks):
    """Read a pty's master side until its slave side is closed."""
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                return
            chunks.append(chunk)
    except OSError:
        return


@needs_pty
def test_progress_redraws_one_line_on_a_terminal(sim, make_client):
    master, slave = os.openpty()
    tty = open(slave, "w", encoding="utf-8")
    chunks = []
    reader = threading.Thread(target=read_all, args=(master, chunks), name="test-pty-reader", daemon=True)
    try:
        client = make_client()
        handler = logging.StreamHandler(tty)
        handler.setFormatter(webqq.LogFormatter())
        handler.setLevel(logging.INFO)
        client.log.addHandler(handler)
        progress = webqq.Progress(client, tty)
        assert progress.handlers == [handler]
        reader.start()
        log_in(sim, client)
        wait_until(lambda: b"2/2 groups" in b"".join(chunks))
        progress.on_progress("member", 1, 2)                            # in progress again...
        client.log.warning("a log line after the progress")            # ...and a log line comes
        client.stop()
        client.log.removeHandler(handler)
        tty.flush()
    finally:
        tty.close()
        reader.join(5)
        os.close(master)
    text = b"".join(chunks).decode("utf-8")
    members = sum(len(g.members) for g in sim.world.groups)
    assert "\r加载联系人 loading contacts: 好友 friends 6\x1b[K\r加载联系人 loading contacts: 好友 friends 6 | 群 " \
        "groups 2\x1b[K\r加载联系人 loading contacts: 好友 friends 6 | 群 groups 2 | 讨论组 discusses 1\x1b[K\r\n" in text
    first = len(sim.world.groups[0].members)
    assert "\r加载群成员 loading members: 1/2 groups, %d members\x1b[K" % first in text
    final = "\r加载群成员 loading members: 2/2 groups, %d members\x1b[K\r\n" % members
    assert final in text                                              # the last line of each stays
    after = text[text.index(final) + len(final):]                 # a log line first wipes the progress
    assert re.match(r"\r加载群成员 loading members: 1/2 groups, %d members\x1b\[K\r\x1b\[K\[[^\n]*\] \[warn\] "
                    r"a log line after the progress\r\n" % members, after), after


@pytest.mark.parametrize("now, expected", [
    ("2024-03-01 04:29:59", "2024-03-01 04:30:00"),
    ("2024-03-01 04:30:00", "2024-03-02 04:30:00"),
    ("2024-12-31 23:59:00", "2025-01-01 04:30:00"),
])
def test_next_daily_relogin_time(now, expected):
    import datetime
    now, expected = (datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S") for text in (now, expected))
    assert webqq.next_clock_time(now, *webqq.parse_clock("4:30")) == expected
    for bad in ("24:00", "4:3", "noon", "12:60"):
        with pytest.raises(ValueError):
            webqq.parse_clock(bad)


def test_daily_relogin_logs_in_again_at_its_time(sim, make_client, monkeypatch):
    import datetime
    monkeypatch.setattr(webqq, "next_clock_time", lambda now, hour, minute: now + datetime.timedelta(seconds=0.5))
    client = log_in(sim, make_client(relogin_at="4:30"))
    client.recorder.wait("relogin", timeout=10)
    assert client.wait_for_state("running", timeout=10) and sim.logins >= 2
    assert len(client.recorder.named("input_qrcode")) == 1                       # the cookie did it: no scan
    assert "webqq-relogin-timer" in [t.name for t in threading.enumerate()]
    client.stop()
    assert "webqq-relogin-timer" not in [t.name for t in threading.enumerate()]


def test_restart_after_an_unrecoverable_logout(sim, tmp_path):
    settings = webqq.Settings(plugins=())
    settings.options.update(smartqq_base=sim.url, tmpdir=str(tmp_path), qr_check_interval=0.05, send_interval=0,
                            qrcode_display="none", poll_timeout=10, http_timeout=5)
    settings.main.update(restart=True, restart_delay=0.2)
    runner = webqq.Runner(settings)
    result = []
    thread = threading.Thread(target=lambda: result.append(runner.run()), name="test-runner")
    thread.start()
    try:
        scan_and_confirm(sim)
        wait_until(lambda: runner.client and runner.client.state == "running")
        first = runner.client
        assert first.state == "running"
        sim.kick(reason="您的帐号在另一地点登录")
        assert first.join(10) and first.exit_status == 1
        deadline = time.time() + 10
        while time.time() < deadline and (runner.client is first or runner.client.state != "running"):
            if sim.qr_state == "waiting":
                scan_and_confirm(sim)
            time.sleep(0.02)
        assert runner.client is not first and runner.client.state == "running"
        assert sim.logins == 2
    finally:
        runner.stop()
        thread.join(15)
    assert result == [0] and not thread.is_alive()
