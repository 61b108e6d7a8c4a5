"""``python -m fastmlgan COMMAND [ARGS...]``: the ``fastmlgan`` command (see fastmlgan/commands/cli.py)."""

from fastmlgan.commands.cli import entry

if __name__ == "__main__":
    entry()
