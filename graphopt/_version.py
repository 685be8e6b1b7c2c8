"""The package version, in a leaf module (graphopt/__init__ re-exports it) so that modules inside
graphopt read it without importing the package itself (an import cycle via graphopt.optimize)."""

__version__ = "0.1.0"
