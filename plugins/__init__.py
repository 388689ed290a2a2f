"""Optional features of webqq, each loaded by name with client.load(name, **options).

This folder is the package webqq_plugins: pip installs it under that name, and in a checkout
webqq.py maps the folder to it. Import its modules as webqq_plugins.<name> (after webqq): a
second name would load a second copy of each module, with classes the core does not know.
"""

if __name__ != "webqq_plugins":
    raise ImportError("import webqq's plugins as webqq_plugins.<name>, after importing webqq, not as %s" % __name__)
