"""Built-in targets (installed as graphopt.targets). One file per target; tvm is imported lazily."""
