"""Simulation: Meta-World robots, simulated cameras, the task registry and the fleet launcher."""
