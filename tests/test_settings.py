"""Settings: one options table per plugin, one refusal for an unknown option, values checked wherever they
come from (INI file, environment, flags, scripts), and errors that name the place, the option and the
closest name; the QR display line only where a QR code is shown."""
import collections
import logging

import pytest

import webqq
from conftest import LogLines

PLUGINS = ["console", "onebot", "openqq", "qrmail", "showmsg"]


# -- one contract: the OPTIONS table, read by one helper -------------------------------------------------------

def test_every_plugin_declares_its_options_in_one_table():
    assert webqq.plugin_names() == PLUGINS
    for name in PLUGINS + ["controller"]:
        module = webqq.plugin_module(name)
        assert isinstance(module.OPTIONS, collections.OrderedDict), name
        assert not hasattr(module, "OPTION_HELP"), name
        for key, entry in module.OPTIONS.items():
            assert len(entry) in (2, 3) and (entry[1] is None or entry[1].strip()), (name, key)
            assert len(entry) == 2 or callable(entry[2]), (name, key)


def test_read_options_refuses_unknown_names_and_fills_in_defaults():
    table = collections.OrderedDict([("post_api", (None, "url", webqq.check_url)), ("retries", (6, "n"))])
    assert webqq.read_options("demo", table, {}) == {"post_api": None, "retries": 6}
    assert webqq.read_options("demo", table, {"retries": 2}) == {"post_api": None, "retries": 2}
    with pytest.raises(webqq.OptionError) as info:
        webqq.read_options("demo", table, {"post_apu": "http://x/"})
    assert str(info.value) == "demo: unknown option 'post_apu' (did you mean 'post_api'?)"
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    with pytest.raises(webqq.OptionError) as info:
        webqq.read_options("demo", table, {"colour": 1})
    assert str(info.value) == "demo: unknown option 'colour'"
    with pytest.raises(webqq.OptionError) as info:
        webqq.read_options("demo", table, {"post_api": "ftp://x/"})
    assert str(info.value) == "demo: post_api must be an http:// or https:// URL, not 'ftp://x/'"


@pytest.mark.parametrize("plugin", PLUGINS)
def test_every_plugin_refuses_an_unknown_option_from_a_script(plugin, make_client):
    client = make_client()
    errors = LogLines(logging.ERROR)
    try:
        assert client.load(plugin, bogus_option=1) is None
    finally:
        errors.close()
    assert errors.lines == ["插件[%s]加载失败 (plugin failed to load): %s: unknown option 'bogus_option'"
                            % (plugin, plugin)]
    assert client.plugins == []


def test_a_misspelt_option_names_the_plugin_and_the_option_meant(make_client):
    client = make_client()
    errors = LogLines(logging.ERROR)
    try:
        assert client.load("openqq", listen="127.0.0.1:0", post_apu="http://127.0.0.1:8000/post") is None
        assert client.load("openqq", listen="127.0.0.1:99999") is None
        assert client.load("opnqq") is None
    finally:
        errors.close()
    assert errors.lines == [
        "插件[openqq]加载失败 (plugin failed to load): openqq: unknown option 'post_apu' (did you mean 'post_api'?)",
        "插件[openqq]加载失败 (plugin failed to load): openqq: listen must be host:port with a port from 0 to 65535, "
        "not '127.0.0.1:99999'",
        "插件[opnqq]加载失败 (plugin failed to load): no plugin called 'opnqq' (did you mean [openqq]?)"]
    assert client.plugin("openqq") is None


def test_the_perl_form_and_the_defaults_reach_call(make_client):
    client = make_client()
    plugin = client.load("openqq", data={"listen": "127.0.0.1:0", "post_event": 0})
    try:
        assert plugin is not None and plugin.opts["post_event"] is False
        assert plugin.opts["post_queue_size"] == 10000 and plugin.opts["check_event_timeout"] == 30.0
    finally:
        plugin.stop()
    assert client.load("openqq", data={"listen": "127.0.0.1:0", "post_apu": "x"}) is None


def test_client_options_are_read_the_same_way(tmp_path):
    with pytest.raises(TypeError, match=r"^webqq: unknown option 'sendinterval' \(did you mean 'send_interval'\?\)$"):
        webqq.Client(tmpdir=str(tmp_path), sendinterval=1)
    with pytest.raises(ValueError, match="^webqq: mode must be online, away, busy, silent, hidden, offline or "
                                         "callme, not 'invisible'$"):
        webqq.Client(tmpdir=str(tmp_path), mode="invisible")
    with pytest.raises(ValueError, match=r"^webqq: upstream must be smartqq or a plugin that provides an upstream "
                                         r"\(onebot\), not 'onebt' \(did you mean 'onebot'\?\)$"):
        webqq.Client(tmpdir=str(tmp_path), upstream="onebt")
    client = webqq.Client(tmpdir=str(tmp_path), log_level="WARNING", mode="Away", qrcode_display="Terminal, file")
    assert (client.options["log_level"], client.options["mode"], client.options["qrcode_display"]) == (
        "warn", "away", "terminal,file")


# -- the configuration: file and line, variable or flag ---------------------------------------------------------

def settings_from(tmp_path, text, environ=None, argv=()):
    path = tmp_path / "webqq.ini"
    path.write_text(text, encoding="utf-8")
    return webqq.load_settings(webqq.build_parser().parse_args(["-c", str(path)] + list(argv)), environ or {})


@pytest.mark.parametrize("text, error", [
    ("[webqq]\nlog_level = verbose\n",
     "line 2: log_level must be debug, info, msg, warn, error or fatal, not 'verbose'"),
    ("[webqq]\nlog_level = inof\n",
     "line 2: log_level must be debug, info, msg, warn, error or fatal, not 'inof' (did you mean 'info'?)"),
    ("[webqq]\n\nmode = invisible\n",
     "line 3: mode must be online, away, busy, silent, hidden, offline or callme, not 'invisible'"),
    ("[webqq]\nqrcode_display = terminal, consle\n", "line 2: qrcode_display must name terminal, file, viewer, "
     "console, email or none (comma-separated), not 'consle' (did you mean 'console'?)"),
    ("[webqq]\nqrcode_display = none, terminal\n", "line 2: qrcode_display can't be none and something else: 'none, terminal'"),
    ("[webqq]\nupstream = onebt\n", "line 2: upstream must be smartqq or a plugin that provides an upstream "
     "(onebot), not 'onebt' (did you mean 'onebot'?)"),
    ("[webqq]\nsmartqq_base = 127.0.0.1:8090\n",
     "line 2: smartqq_base must be an http:// or https:// URL, not '127.0.0.1:8090'"),
    ("[webqq]\npause_on_error = sometimes\n", "line 2: pause_on_error must be yes, no or auto, not 'sometimes'"),
    ("[openqq]\nlisten = 127.0.0.1:99999\n",
     "line 2: listen must be host:port with a port from 0 to 65535, not '127.0.0.1:99999'"),
    ("[openqq]\nlisten = [{\"host\": \"::1\", \"port\": 70000}]\n",
     "line 2: listen must be host:port with a port from 0 to 65535, not {\"host\":\"::1\",\"port\":70000}"),
    ("[openqq]\npost_api = htp://127.0.0.1:8000/post\n",
     "line 2: post_api must be an http:// or https:// URL, not 'htp://127.0.0.1:8000/post'"),
    ("[openqq]\npoll_api = http://127.0.0.1:80000/poll\n",
     "line 2: poll_api must be a URL with a port from 1 to 65535, not 'http://127.0.0.1:80000/poll'"),
    ("[onebot]\nurl = 127.0.0.1:3000\n", "line 2: url must be an http:// or https:// URL, not '127.0.0.1:3000'"),
    ("[onebot]\nlisten = 127.0.0.1:65536\n",
     "line 2: listen must be host:port with a port from 0 to 65535, not '127.0.0.1:65536'"),
    ("[qrmail]\ntls = tsl\n", "line 2: tls must be ssl, starttls or none, not 'tsl' (did you mean 'ssl'?)"),
    ("[qrmail]\nport = 0\n", "line 2: port must be a port from 1 to 65535, not '0'"),
    ("[webqq]\n\n[opnqq]\n", "line 3: [opnqq] is not a plugin webqq can load (did you mean [openqq]?)"),
    ("[zzz]\n", "line 1: [zzz] is not a plugin webqq can load (the plugins: console, onebot, openqq, qrmail, "
                "showmsg)"),
])
def test_enumerations_ports_and_urls_are_checked_with_the_line(tmp_path, text, error):
    with pytest.raises(webqq.ConfigError) as info:
        settings_from(tmp_path, text)
    assert str(info.value) == "%s, %s" % (tmp_path / "webqq.ini", error)


@pytest.mark.parametrize("environ, argv, error", [
    ({"WEBQQ_OPENQQ_POST_APII": "http://x/"}, [],
     "environment variable WEBQQ_OPENQQ_POST_APII: unknown option 'post_apii' in [openqq] (did you mean 'post_api'?)"),
    ({"WEBQQ_MODE": "invisible"}, [], "environment variable WEBQQ_MODE: mode must be online, away, busy, silent, "
                                      "hidden, offline or callme, not 'invisible'"),
    ({}, ["--log-level", "verbose"], "flag --log-level: log_level must be debug, info, msg, warn, error or fatal, "
                                     "not 'verbose'"),
    ({}, ["--listen", "127.0.0.1:99999"],
     "flag --listen: listen address '127.0.0.1:99999': port 99999 is out of range (0 to 65535)"),
    ({}, ["-o", "onebot.url=ws://127.0.0.1:3001"],
     "flag -o onebot.url=ws://127.0.0.1:3001: url must be an http:// or https:// URL, not 'ws://127.0.0.1:3001'"),
])
def test_environment_and_flags_are_checked_too(tmp_path, environ, argv, error):
    with pytest.raises(webqq.ConfigError) as info:
        settings_from(tmp_path, "[webqq]\n[openqq]\n", environ, argv)
    assert str(info.value) == error


def test_checked_values_are_kept_in_their_own_form(tmp_path):
    settings = settings_from(tmp_path, "[webqq]\nlog_level = WARNING\nqrcode_display = File, terminal\n"
                                       "[openqq]\nlisten = 127.0.0.1:5001, [::1]:5001\n"
                                       "post_api = https://example.com:8443/post\n[qrmail]\nport = 587\n")
    assert settings.options["log_level"] == "warn" and settings.options["qrcode_display"] == "file,terminal"
    assert settings.plugins["openqq"] == {"listen": "127.0.0.1:5001, [::1]:5001",
                                          "post_api": "https://example.com:8443/post"}
    assert settings.plugins["qrmail"] == {"port": 587}


def test_a_misspelt_flag_gets_the_flag_meant(capsys):
    with pytest.raises(SystemExit) as info:
        webqq.build_parser().parse_args(["--lisen", "127.0.0.1:5000"])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "webqq: error: unrecognized arguments: --lisen 127.0.0.1:5000 (did you mean '--listen'?)\n")


# -- as people start it: exit status 2, the message, no traceback ----------------------------------------------

HINT_FLAG = "提示 (hint): fix that flag (python webqq.py --help lists them all)\n"
HINT_LINE = "提示 (hint): fix that line of the config file (python webqq.py --init-config writes a commented example)\n"


@pytest.mark.parametrize("args, ini, expected", [
    (["--log-level", "verbose"], None, "\n错误 (error): flag --log-level: log_level must be debug, info, msg, warn, "
                                       "error or fatal, not 'verbose'\n" + HINT_FLAG),
    (["--mode", "invisible", "--check-config"], None, "\n错误 (error): flag --mode: mode must be online, away, busy, "
                                                       "silent, hidden, offline or callme, not 'invisible'\n" + HINT_FLAG),
    (["--listen", "127.0.0.1:99999", "--check-config"], None, "\n错误 (error): flag --listen: listen address "
     "'127.0.0.1:99999': port 99999 is out of range (0 to 65535)\n" + HINT_FLAG),
    (["-c", "webqq.ini"], "[webqq]\n\n[opnqq]\nlisten = 127.0.0.1:0\n",
     "\n错误 (error): webqq.ini, line 3: [opnqq] is not a plugin webqq can load (did you mean [openqq]?)\n" + HINT_LINE),
    (["-c", "webqq.ini"], "[openqq]\nlisten = 127.0.0.1:0\npost_api = htp://127.0.0.1:8000/post\n",
     "\n错误 (error): webqq.ini, line 3: post_api must be an http:// or https:// URL, not "
     "'htp://127.0.0.1:8000/post'\n" + HINT_LINE),
    (["--lisen", "127.0.0.1:5000"], None, "usage: webqq [-c FILE] [--demo] [--init-config [PATH]] [options]\n"
     "webqq: error: unrecognized arguments: --lisen 127.0.0.1:5000 (did you mean '--listen'?)\n"),
    (["controller", "--log-level", "verbose"], None, "webqq controller: error: argument --log-level: must be debug, "
     "info, msg, warn, error or fatal, not 'verbose'\n"),
])
def test_configuration_errors_stop_webqq_with_status_2(tmp_path, launch, args, ini, expected):
    if ini is not None:
        (tmp_path / "webqq.ini").write_text(ini, encoding="utf-8")
    program = launch(*args, env={"PYTHONIOENCODING": "utf-8"})
    assert program.wait() == 2
    log = program.log()
    assert log.endswith(expected), log
    assert program.output() == "" and "listening" not in log


# -- the QR display line: only where a QR code is shown ---------------------------------------------------------

def test_none_shows_the_qr_code_nowhere_and_says_so(sim, make_client):
    client = make_client(qrcode_display="none")
    assert client.load("openqq", listen="127.0.0.1:0") is not None
    console = client.load("console")
    infos = LogLines(logging.INFO)
    try:
        client.start()
        assert sim.wait_qr("waiting") and client.recorder.wait("input_qrcode")
    finally:
        infos.close()
    assert [line for line in infos.lines if "二维码显示方式" in line] == [
        "二维码显示方式 none: 插件 console 不显示二维码 (qrcode_display is none: the console plugin shows no QR code)"]
    assert client.qrcode and console.status()["qrcode"] is None and console.shows(client.qrcode) is False
