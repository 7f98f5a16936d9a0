"""Helpers the test tiers share: waiting for a condition, the services' HTTP probe server,
and a serial-bridge in a process of its own."""
