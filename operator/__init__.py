"""promptcache control plane: the CLI roles, migrations, CRD handlers and the replay engine."""
