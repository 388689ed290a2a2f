# -*- coding: utf-8 -*-
"""qrmail: e-mail the login QR code, and a fresh one each time the previous one expired.

    client.load("qrmail", host="smtp.example.com", user="me@example.com",
                password="the SMTP authorisation code", to="me@example.com")

For a headless server: scan the code from the mail on another screen. Mail providers such as
QQ Mail, 163 and Gmail want an *authorisation code* (app password) here, not the account's
password. Keep it out of the config file with WEBQQ_QRMAIL_PASSWORD.

Each QR code is mailed once, from a thread of its own, so a slow mail server never holds the
login up; when a new QR code arrives while an older one still waits, only the new one is sent,
and nothing is sent once the login went through.
"""

import base64
import collections
import smtplib
import socket
import ssl
import threading
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from webqq import check_port, non_negative, one_of

DEFAULT_PORTS = {"ssl": 465, "starttls": 587, "none": 25}

# option: (default, one line of help[, check])
OPTIONS = collections.OrderedDict([
    ("host", (None, "SMTP server, e.g. smtp.qq.com (required)")),
    ("port", (None, "SMTP port (default: 465 with tls = ssl, 587 with starttls, 25 with none)", check_port)),
    ("tls", ("ssl", "ssl (TLS from the start), starttls, or none (only for a relay on this machine)",
             one_of(*DEFAULT_PORTS))),
    ("user", (None, "SMTP login (default: no login)")),
    ("password", (None, "SMTP password or authorisation code (better: WEBQQ_QRMAIL_PASSWORD)")),
    ("to", (None, "recipients, comma-separated (required)")),
    ("from", (None, "sender address (default: user)")),
    ("subject", ("webqq: scan this QR code to log in ({account})",
                 "mail subject; {account} and {number} are replaced")),
    ("cafile", (None, "CA certificates to trust for the server (default: the system's)")),
    ("timeout", (30.0, "seconds to wait for the server", non_negative)),
])
ATTEMPTS = 3  # per QR code, a few seconds apart (connections get reset: qqbot #344)


class QRMail(object):
    """Mails each new QR code from its own thread; stop() ends the thread."""

    def __init__(self, client, options):
        opts = dict(options)
        for name in ("host", "to"):
            if not opts[name]:
                raise ValueError("qrmail: option %s is required" % name)
        opts["port"] = int(opts["port"] or DEFAULT_PORTS[opts["tls"]])
        recipients = opts["to"] if isinstance(opts["to"], (list, tuple)) else str(opts["to"]).split(",")
        self.to = [address.strip() for address in recipients if address.strip()]
        self.sender = opts["from"] or opts["user"] or self.to[0]
        self.opts, self.client, self.log = opts, client, client.log
        self.cond = threading.Condition()
        self.pending = None  # (number, png) of the newest QR code not mailed yet
        self.count = 0
        self.sent = 0
        self.stopped = False
        self.thread = client.thread("qrmail", self.work)
        self.thread.start()
        client.on("login", self.on_login)
        self.qr_display = "email to %s via %s:%d (%s)" % (", ".join(self.to), opts["host"], opts["port"], opts["tls"])

    def show_qrcode(self, path, png):
        """A QR code to scan: mail it (the client calls this when e-mail is a QR display)."""
        with self.cond:
            self.count += 1
            self.pending = (self.count, png)
            self.cond.notify_all()

    def on_login(self, is_scan):
        with self.cond:
            self.pending = None

    def work(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopped or self.pending is not None)
                if self.stopped:
                    return
                number, png = self.pending
                self.pending = None
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    self.send(self.message(number, png))
                    self.sent += 1
                    self.log.info("二维码#%d已发送到邮箱 (QR code #%d mailed to %s)", number, number, ", ".join(self.to))
                    break
                except Exception as e:  # the thread lives on: the next QR code may get through
                    self.log.warning("二维码邮件发送失败 (mailing QR code #%d failed, attempt %d of %d): %s",
                                     number, attempt, ATTEMPTS, e)
                with self.cond:
                    if attempt == ATTEMPTS or self.cond.wait_for(
                            lambda: self.stopped or self.pending is not None, 5.0 * attempt):
                        break

    def message(self, number, png):
        """The mail: a line of instructions and the QR code as an inline PNG."""
        msg = EmailMessage()
        msg["Subject"] = self.opts["subject"].replace("{account}", self.client.account).replace(
            "{number}", str(number))
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.to)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain="webqq.local")
        msg.set_content("QR code #%d for account %s, sent %s.\n\nScan it with the QQ app (scan), then tap "
                        "Allow on the phone. It expires after about two minutes; webqq then mails a new one.\n"
                        % (number, self.client.account, time.strftime("%Y-%m-%d %H:%M:%S")))
        msg.add_attachment(png, maintype="image", subtype="png", filename="qrcode-%d.png" % number,
                           disposition="inline")
        return msg

    def send(self, msg):
        opts = self.opts
        context = ssl.create_default_context(cafile=opts["cafile"])
        local = socket.getfqdn()
        try:
            local.encode("ascii")
        except UnicodeEncodeError:  # a non-ASCII host name breaks EHLO (qqbot #158, #362)
            local = "localhost"
        if opts["tls"] == "ssl":
            smtp = smtplib.SMTP_SSL(opts["host"], opts["port"], local, timeout=opts["timeout"], context=context)
        else:
            smtp = smtplib.SMTP(opts["host"], opts["port"], local, timeout=opts["timeout"])
        try:
            if opts["tls"] == "starttls":
                smtp.starttls(context=context)
            if opts["user"]:
                self.login(smtp, opts["user"], opts["password"] or "")
            smtp.send_message(msg, self.sender, self.to)
        finally:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()

    @staticmethod
    def login(smtp, user, password):
        """SMTP login; AUTH PLAIN in UTF-8 (RFC 4616) for a user or password smtplib can't send (non-ASCII)."""
        try:
            (user + password).encode("ascii")
        except UnicodeEncodeError:
            smtp.ehlo_or_helo_if_needed()
            token = base64.b64encode(("\0%s\0%s" % (user, password)).encode("utf-8")).decode("ascii")
            code, answer = smtp.docmd("AUTH", "PLAIN " + token)
            if code != 235:
                raise smtplib.SMTPAuthenticationError(code, answer)
            return
        smtp.login(user, password)

    def stop(self):
        """End the mail thread (a mail in progress finishes first)."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join()


def call(client, **options):
    """The plugin entry point: mail client's QR codes; returns the plugin (it has stop())."""
    return QRMail(client, options)
