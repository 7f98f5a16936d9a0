"""Disaster recovery, host side: plan rules, address mapping and change signing.

The service that drives runs is ``services/dr-orchestrator``; the guest side is
``guestbus_agent.dr``. See docs/dr.md.
"""
