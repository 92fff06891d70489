"""``python -m fer_sweep.ui``, the documented command, stays here; the tool itself lives in
fer_sweep.tools.ui."""

import sys

from fer_sweep.tools.ui import main

if __name__ == "__main__":
    sys.exit(main())
