"""``python -m fer_sweep.ensemble``, the documented command, stays here; the tool itself lives in
fer_sweep.tools.ensemble."""

import sys

from fer_sweep.tools.ensemble import main

if __name__ == "__main__":
    sys.exit(main())
