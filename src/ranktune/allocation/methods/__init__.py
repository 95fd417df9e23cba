"""The built-in allocation methods: importing this package registers them.

A new method is one module here (its settings, builder and capabilities) plus its name in `BUILTINS`; the order of
`BUILTINS` is the order the config's messages list the methods in.
"""

from importlib import import_module

BUILTINS = ("none", "l1ra", "adalora", "hetero", "eva", "gradient")

for _name in BUILTINS:
    import_module(f"{__name__}.{_name}")
