"""Learner side of lorafleet: losses, algorithms and the training step."""
