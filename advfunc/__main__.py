"""``python -m advfunc``: the same command as the ``advfunc`` console script."""

from advfunc.app.cli import entry_point

raise SystemExit(entry_point())
