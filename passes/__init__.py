"""Built-in rewrite passes (installed as graphopt.passes). One file per pass."""
