"""The old name of ``advfunc decoder``: ``python -m advfunc.app.decoder_job [FLAGS]`` runs it with a warning."""

import sys
import warnings

from advfunc.app.cli import main

if __name__ == "__main__":
    warnings.warn("`python -m advfunc.app.decoder_job` is now `advfunc decoder`", FutureWarning, stacklevel=1)
    raise SystemExit(main(["decoder", *sys.argv[1:]]))
