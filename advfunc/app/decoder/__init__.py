"""The decoder job: ``advfunc decoder``, LoRA fine-tuning of a causal LM compared over methods."""
