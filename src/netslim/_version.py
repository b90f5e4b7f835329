"""netslim's version, written here and nowhere else.

The package metadata reads it at build time (pyproject's dynamic version, without importing
netslim), `netslim --version` and `netslim.__version__` at run time.
"""
__version__ = "0.1.0"
