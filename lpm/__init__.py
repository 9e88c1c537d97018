"""lpm: Large Population Models."""
__version__ = "0.1.0"
