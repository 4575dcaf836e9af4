"""envs (later issues)."""
