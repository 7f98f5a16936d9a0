"""Tests of the service runtime, the embedded broker, provisioning and ``guestbus up``."""
