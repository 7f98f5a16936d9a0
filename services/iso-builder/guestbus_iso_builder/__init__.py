"""iso-builder: Per-VM tools and config ISO media."""

__version__ = "0.1.0"
