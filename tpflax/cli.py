"""The ``tpflax`` command line (a thin layer over the library; see ``tpflax --help``)."""

from tpflax._src.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
