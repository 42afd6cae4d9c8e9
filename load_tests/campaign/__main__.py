"""``python -m load_tests.campaign``: see :mod:`load_tests.campaign.cli`."""

import contextlib

from load_tests.campaign.cli import main

with contextlib.suppress(KeyboardInterrupt):
    main()
