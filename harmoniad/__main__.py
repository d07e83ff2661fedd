"""``python -m harmoniad``: see :mod:`harmoniad.cli`."""

from harmoniad.cli import main

raise SystemExit(main())
