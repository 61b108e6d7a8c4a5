"""``python -m fastmlgan.reproduce``: the reproduce command (``fastmlgan.commands.reproduce``)."""

from fastmlgan.commands.reproduce import main

if __name__ == "__main__":
    raise SystemExit(main())
