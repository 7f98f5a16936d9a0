"""guestbus tests: one package, so that test modules and mypy agree on module names
(``tests.link._support``) and shared helpers live once, in :mod:`tests.support`."""
