"""``python -m fastmlgan.reproduce``."""

from fastmlgan.reproduce.cli import main

raise SystemExit(main())
