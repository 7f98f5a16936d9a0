"""The operator CLI, ``guestbus``."""
