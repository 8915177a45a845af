"""The cloud learner: gRPC services, durable store, trainer, reference VLA, registry."""
