"""Built-in search strategies (installed as graphopt.search). One file per strategy."""
