"""Data and judgement: the data and its fit / select / held-out split, fidelity, metrics, quality."""
