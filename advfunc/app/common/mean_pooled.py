"""An earlier name of :mod:`advfunc.hf.mean_pooled` (importing it still registers the model type)."""

import warnings

from advfunc.hf.mean_pooled import *  # noqa: F403

warnings.warn("advfunc.app.common.mean_pooled is now advfunc.hf.mean_pooled", FutureWarning, stacklevel=2)
