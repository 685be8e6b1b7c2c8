"""The run directory (--out): its lock and atomic outputs, the SQLite run store, `graphopt runs`."""
