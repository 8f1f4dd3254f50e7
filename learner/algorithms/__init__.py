"""RL algorithm math (pure torch functions)."""
