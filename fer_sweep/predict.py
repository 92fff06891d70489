"""``python -m fer_sweep.predict``, the documented command, stays here; the tool itself lives in
fer_sweep.tools.predict."""

import sys

from fer_sweep.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
