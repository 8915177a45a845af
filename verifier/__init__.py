"""The preemptive verifier, robot side: the always-on envelope and the chunk gate."""
