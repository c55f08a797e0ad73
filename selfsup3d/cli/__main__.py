"""``python -m selfsup3d.cli`` is the ``selfsup3d`` command."""

import sys

from selfsup3d.cli import main

if __name__ == "__main__":
    sys.exit(main())
