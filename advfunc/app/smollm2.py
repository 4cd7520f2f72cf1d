"""The old name of :mod:`advfunc.app.decoder.smollm2`: ``python -m advfunc.app.smollm2`` still converts."""

import warnings

from advfunc.app.decoder.smollm2 import *  # noqa: F403
from advfunc.app.decoder.smollm2 import main

warnings.warn("advfunc.app.smollm2 is now python -m advfunc.app.decoder.smollm2", FutureWarning, stacklevel=2)
if __name__ == "__main__":
    raise SystemExit(main())
