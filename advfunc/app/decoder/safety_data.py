"""The old name of :mod:`advfunc.hf.refusal_task`, the judge-free refusal task."""

import warnings

from advfunc.hf.refusal_task import *  # noqa: F403

warnings.warn("advfunc.app.decoder.safety_data is now advfunc.hf.refusal_task", FutureWarning, stacklevel=2)
