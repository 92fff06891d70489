"""``python -m fer_sweep.serve``, the documented command, stays here; the tool itself lives in
fer_sweep.tools.serve."""

import sys

from fer_sweep.tools.serve import main

if __name__ == "__main__":
    sys.exit(main())
