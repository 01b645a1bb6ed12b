"""The installed `quasar` command: `quasar serve ...` is python -m quasar.serve ...; anything
else is python -m quasar.run ... (the demo with no arguments)."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:
        from quasar.serve.cli import main as serve_main
        return serve_main(args[1:])
    from quasar.run import main as run_main
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
