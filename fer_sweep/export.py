"""``python -m fer_sweep.export``, the documented command, stays here; the tool itself lives in
fer_sweep.tools.export."""

import sys

from fer_sweep.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
