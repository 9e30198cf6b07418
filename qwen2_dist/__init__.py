"""qwen2-dist: distributed pretraining of the Qwen2 model family."""

__version__ = "0.1.0"
