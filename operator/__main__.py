"""``python -m promptcache.operator``: the ``promptcache`` command."""

from promptcache.operator.cli import main

raise SystemExit(main())
