"""cert-authority: Cluster CA for VM client and gateway server certificates."""

__version__ = "0.1.0"
