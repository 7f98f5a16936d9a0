"""dr-orchestrator: Disaster-recovery plans and failover runs (re-IP, recovery scripts)."""

__version__ = "0.1.0"
