"""flowdb's benchmark: steps per second against the raw SQL limit and against peer engines, in one run."""
