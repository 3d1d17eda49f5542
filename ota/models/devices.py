"""Devices, enrollment, credentials and what the fleet reports."""
