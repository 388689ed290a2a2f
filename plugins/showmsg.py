"""showmsg: print every message received and sent, and the contact changes, one line each.

Options: allow_group / ban_group (group names or numbers, a list or a comma-separated string)
limit which groups' messages are printed.
"""

import collections

# option: (default, one line of help)
OPTIONS = collections.OrderedDict([
    ("allow_group", (None, "print only the messages of these groups (names or numbers, comma-separated)")),
    ("ban_group", (None, "never print the messages of these groups")),
])
LABELS = {"friend_message": "好友消息", "group_message": "群消息", "discuss_message": "讨论组消息",
          "sess_message": "临时消息"}
CHANGES = {
    "new_friend": "新增好友", "lose_friend": "删除好友", "new_group": "加入群", "lose_group": "退出群",
    "new_discuss": "加入讨论组", "lose_discuss": "退出讨论组",
    "new_group_member": "新成员加入群", "lose_group_member": "成员退出群",
    "new_discuss_member": "新成员加入讨论组", "lose_discuss_member": "成员退出讨论组",
}


def _names(value):
    """A set of group names/numbers from a list or a comma-separated string (None: no filter)."""
    if value in (None, ""):
        return None
    items = value.split(",") if isinstance(value, str) else value
    return {str(item).strip() for item in items}


def describe(msg):
    """One line for a message: [label] who : content."""
    if msg.cls == "recv":
        who = msg.sender.displayname if msg.sender is not None else "?"
        if msg.place is not None:
            who += "|" + str(msg.place.displayname)
    else:
        who = "我->%s" % (msg.addressee.displayname if msg.addressee is not None else "?")
    line = "[%s] %s : %s" % (LABELS.get(msg.type, msg.type), who, msg.content)
    if msg.cls == "send" and msg.code not in (0, None):
        line += " (%s: %s)" % (msg.msg, msg.info)
    return line


def call(client, allow_group, ban_group):
    """The plugin entry point: print client's messages and contact changes."""
    allowed, banned = _names(allow_group), _names(ban_group)

    def shown(msg):
        group = msg.group
        if msg.type != "group_message" or group is None:
            return True
        keys = {str(group.name), str(group.displayname), str(group.uid)}
        return (allowed is None or keys & allowed) and not (banned and keys & banned)

    def on_message(msg):
        if shown(msg):
            client.log.log(25, "%s", describe(msg))

    def on_change(event):
        def handler(obj, container=None):
            where = "" if container is None else " [%s]" % container.displayname
            client.log.info("%s: %s%s", CHANGES[event], obj.displayname, where)
        return handler

    client.on("receive_message", on_message)
    client.on("send_message", on_message)
    for event in CHANGES:
        client.on(event, on_change(event))
    client.on("relogin", lambda: client.log.info("已重新登录 (logged in again)"))
