"""The audit log page at /audit/ (views.py: audit_log). Entries are written by registry.audit."""
