"""``python -m advfunc``: the same command as the ``advfunc`` console script."""

from advfunc.app.cli import main

raise SystemExit(main())
