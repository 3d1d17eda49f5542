"""What the registry announces to the apps above it, which it never imports: Django signals
they connect to in their AppConfig.ready()."""

from __future__ import annotations

from django.dispatch import Signal

# Sent once a version's release has committed, with `version_id`. The rollout service builds the
# deltas from the previous release to this one then (ota.rollouts.deltas), off the request path.
version_released = Signal()
