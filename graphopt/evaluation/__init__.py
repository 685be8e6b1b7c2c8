"""Data and judgement: data sources and their fit / select / held-out split, fidelity against the original, metrics, and the run's quality bookkeeping."""
