"""The learner role: one base model with LoRA adapters and the algorithms that train them
(`algorithms.registry.learner_class` picks the learner of a config)."""
