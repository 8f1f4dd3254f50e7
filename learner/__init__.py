"""The learner role: one base model with LoRA adapters (model.py), the actor that owns them and
the adapter version (actor.py), and the updaters composed into it (rl.py with the algorithms'
objectives.py, offline.py, reward_adapter.py, meet.py)."""
