"""rsscene: ResNet classifiers for remote-sensing scene images."""

__version__ = "0.1.0"
