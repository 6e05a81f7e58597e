"""The release version of flexiq_jax, in one place: pyproject.toml reads it (setuptools' dynamic
version), `flexiq_jax.__version__` re-exports it, `run.py --version` prints it and every run
record carries it (`records.run_info`)."""

__version__ = "0.3.0"
