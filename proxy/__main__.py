"""``python -m promptcache.proxy --config FILE``: the proxy role on its own."""

from promptcache.proxy.http.server import main

raise SystemExit(main())
