"""Optional features of webqq, each loaded by name with client.load(name, **options)."""
