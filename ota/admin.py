"""Django admin for ota. Devices part first; rollout admin classes follow below."""

from django.contrib import admin
