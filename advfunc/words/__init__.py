"""Word-level attacks on text classifiers: HotFlip, and synonym substitution (PWWS, TextFooler) over WordNet."""
