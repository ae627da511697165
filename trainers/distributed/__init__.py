"""The K-worker algorithms: one class per module behind the protocol of `base.Algorithm`, registered by
name in `trainers.registry.ALGORITHMS` (what `distributed.algorithm` accepts)."""
