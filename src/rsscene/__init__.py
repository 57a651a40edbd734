"""rsscene: ResNet classifiers for remote-sensing scene images."""

# The version's one source: pyproject.toml reads it (tool.setuptools.dynamic), and so does
# everything that records or prints it (rsscene --version, run folders, exports).
__version__ = "0.1.0"
