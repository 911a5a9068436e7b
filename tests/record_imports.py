"""`python tests/record_imports.py ARGS` runs `kvflow ARGS` and, when it exits, writes the names of
the modules it loaded to $KVFLOW_IMPORTS_LOG as a JSON list (tests/test_dependencies.py)."""

import atexit
import json
import os
import sys


def _write_modules() -> None:
    with open(os.environ["KVFLOW_IMPORTS_LOG"], "w") as f:
        json.dump(sorted(sys.modules), f)


if __name__ == "__main__":  # not in the engine-core process, which re-imports this file as __mp_main__
    atexit.register(_write_modules)
    from kvflow.cli import main

    sys.exit(main(sys.argv[1:]))
