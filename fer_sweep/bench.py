"""``python -m fer_sweep.bench``, the documented command, stays here; the tool itself lives in
fer_sweep.tools.bench."""

import sys

from fer_sweep.core import runtime

if __name__ == "__main__":  # the program, not a library import: tune before torch loads
    runtime.tune()

from fer_sweep.tools.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
