"""``python -m benchmarks.run``: see :mod:`benchmarks.run.cli`."""

import sys

from benchmarks.run.cli import main

sys.exit(main())
