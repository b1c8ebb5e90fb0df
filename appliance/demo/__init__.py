"""``edugate demo``: the real gate pipeline on a temporary journal, a sample roster and scripted taps."""
