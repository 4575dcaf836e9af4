"""rollout (later issues)."""
