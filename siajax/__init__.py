"""siajax: self-improving AI in JAX — a harness lever and a weight lever in one loop."""

__version__ = "0.1.0"
