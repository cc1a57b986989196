"""``python -m memprof`` and the ``memprof`` console script.

The command-line modules (typer, rich, memprof's commands) take a moment to import; Ctrl-C during
that moment ends the run like any other Ctrl-C: one line and exit 130, no traceback.
"""

import os
import sys


def main() -> None:
    try:
        from memprof.cli import main as run
    except KeyboardInterrupt:
        try:
            sys.stderr.write("ERROR: interrupted\n")
            sys.stderr.flush()
        finally:
            os._exit(130)
    run()


if __name__ == "__main__":
    main()
