"""Rollouts, waves and per-device assignments."""
