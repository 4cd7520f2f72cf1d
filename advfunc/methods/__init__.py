"""Training steps: one module per method, each a recipe over its attack in ``advfunc.attacks``."""
