"""mrfm's version, in a module of its own so that any engine module can import it without
importing the ``engine`` package (whose ``__init__`` reaches the run path)."""

__version__ = "0.1.0"
