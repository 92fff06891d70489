"""``python -m fer_sweep.report``, the documented command, stays here; the tool itself lives in
fer_sweep.tools.report (cli)."""

import sys

from fer_sweep.tools.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
