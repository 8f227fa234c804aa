"""fewshot: a command-line experiment runner for few-shot meta-learning on images."""

__version__ = "0.1.0"
