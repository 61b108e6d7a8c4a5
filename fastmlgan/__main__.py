"""``python -m fastmlgan COMMAND [ARGS...]``: the ``fastmlgan`` command (see fastmlgan/cli.py)."""

from fastmlgan.cli import entry

if __name__ == "__main__":
    entry()
