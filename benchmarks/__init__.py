"""Benchmarks of advfunc's steps against a plain step and the classic imperative classes.

Entry points (run from the repository root, so ``tests`` is importable for the references):

- ``python -m benchmarks.step``: timing table, ratios to the plain step, pass-count floors,
  peak memory, optionally the dynamic-sequence-length study.
- ``python -m benchmarks.memory``: one case's peak memory in a fresh process (called by
  ``benchmarks.step`` on CPU, one subprocess per case).
- ``python -m benchmarks.profile``: ``torch.profiler`` top-ops tables of a plain step and
  of one method's implementation.
- ``bash benchmarks/gpu.sh``: the CUDA step benchmark bounded to one ~9-minute command
  (BERT-base and a Qwen2-0.5B shape with LoRA, ``benchmarks.step --per-method`` per shape
  under ``timeout``).
"""
