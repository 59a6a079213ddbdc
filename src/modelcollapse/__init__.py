"""modelcollapse: model-fitting feedback loops, and whether the models collapse."""

__version__ = "0.2.0"
