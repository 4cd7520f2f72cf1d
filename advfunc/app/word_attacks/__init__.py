"""Word-level attacks on a text classifier: HotFlip, the WordNet synonym attack, the victims they query."""
