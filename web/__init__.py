"""The operator web UI, in rooms: one folder per page area, named after its URL, each with its
views (thin: they read through the room's queries and change state only through registry,
ota.rollouts and ota.fleet, the same functions the API calls) and its read-only queries.

    overview/   the dashboard at /: fleet counts, charts, automatic decisions, open rollouts
    devices/    the device list and device page, revoking a device
    registry/   models, versions (health contract, rollouts of a version), aliases; release,
                deprecate, revoke
    rollouts/   the rollout list, the rollout page (live figures, actions), the new-rollout wizard
    audit/      the audit log
    access/     API tokens, enrollment tokens, the public signing keys (admin)

Shared by the rooms: roles.py (the role checks every view runs on the server), pages.py
(rendering a page with the user's role), login.py, forms.py, urls.py. Templates are in
templates/web/.
"""
