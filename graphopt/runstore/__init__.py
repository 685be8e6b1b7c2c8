"""The run directory (--out): its lock and atomic outputs, the SQLite run store, and finished runs (`graphopt runs`)."""
