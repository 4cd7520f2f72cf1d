"""Scaling a step out: data-parallel all-reduce, dynamic fp16 loss scaling, micro-batch accumulation."""
