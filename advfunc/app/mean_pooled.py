"""The old name of :mod:`advfunc.app.common.mean_pooled`: importing it still registers the mean-pooled model type."""

import warnings

from advfunc.app.common.mean_pooled import *  # noqa: F403

warnings.warn(
    "advfunc.app.mean_pooled is now advfunc.app.common.mean_pooled; import that name", FutureWarning, stacklevel=2
)
