"""Every command-line entry point, one module per ``fastmlgan COMMAND`` (the dispatcher is
``cli``). Commands sit above the library: no library module imports them, and no library module
defines a ``main()``. Each also runs as ``python -m fastmlgan.commands.COMMAND``."""
