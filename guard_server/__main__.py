"""Run the CLI with ``python -m guard_server``."""

from guard_server.cli import main

raise SystemExit(main())
