"""The built-in allocation methods: importing this package registers them.

A new method is one module here (its settings, builder and capabilities) plus its name in `BUILTINS`; the order of
`BUILTINS` is the order the config's messages list the methods in. A method whose settings hold another's (L1RA's
`start` holds the gradient method's) imports it, so that one comes first.
"""

from importlib import import_module

BUILTINS = ("none", "gradient", "l1ra", "adalora", "hetero", "eva")

for _name in BUILTINS:
    import_module(f"{__name__}.{_name}")
