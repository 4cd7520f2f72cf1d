"""The classifier job: ``advfunc train``, ``evaluate`` and ``compare``."""
