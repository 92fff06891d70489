"""``python -m fer_sweep.bench``, the documented command, stays here; the tool itself lives in
fer_sweep.tools.bench."""

import sys

from fer_sweep.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
