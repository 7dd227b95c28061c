"""``python -m tpflax``: the ``tpflax`` command line, for an environment whose scripts are not on PATH."""

import sys

from tpflax._src.cli import main

if __name__ == "__main__":
    sys.exit(main())
