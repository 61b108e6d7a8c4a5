"""``fastmlgan sweep NAME OUT_DIR X=RESULTS_DIR[:ROW] ...``: one row of the reproduction harness
against its references across several results folders (``fastmlgan.reproduce.sweep``, whose
docstring is this command's help).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastmlgan.errors import FastMLGANError
from fastmlgan.reproduce import sweep
from fastmlgan.reproduce.sweep import collect, parse_point, plot, render


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or "-h" in argv or "--help" in argv:
        print(sweep.__doc__)
        return 0 if ("-h" in argv or "--help" in argv) else 2
    try:
        name, out = argv[0], Path(argv[1])
        points = collect([parse_point(a) for a in argv[2:]])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"sweep-{name}.json").write_text(json.dumps(points, indent=2) + "\n")
        figure = plot(name, points, out / f"sweep-{name}.png")
        text = render(name, points) + (f"\n![{name}]({figure})\n" if figure else "")
        (out / f"sweep-{name}.md").write_text(text)
        print(text)
        return 0
    except FastMLGANError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
