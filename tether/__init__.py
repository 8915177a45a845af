"""Tether: a deployment-side robot runtime with an online learning loop."""
__version__ = "0.1.0"
