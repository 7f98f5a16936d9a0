"""The benchmarks of bench/, run in their smoke modes."""
