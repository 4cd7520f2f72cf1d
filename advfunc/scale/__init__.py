"""Scaling a step out: data-parallel all-reduce, dynamic fp16 loss scaling, micro-batch accumulation.

Also the adaptive attack as a ``Trainer`` callback (:mod:`advfunc.scale.attack_callback`),
which follows a defence's robustness while it trains.
"""
