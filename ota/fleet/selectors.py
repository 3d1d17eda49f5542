"""Finding devices: the one device filter the API's device list and the web's device page use,
and the queryset both show devices with."""

from __future__ import annotations

from collections.abc import Iterable

from django.db import connection
from django.db.models import Exists, OuterRef, Prefetch, Q, QuerySet
from django.db.models.fields.json import KeyTransform

from ota.models import Device, DeviceModelState


def devices_with_states() -> QuerySet:
    """Devices with their hardware and, per model, what is active (one query each)."""
    states = DeviceModelState.objects.select_related("model", "active_version").order_by("model__name")
    return Device.objects.select_related("hardware").prefetch_related(Prefetch("model_states", queryset=states))


def devices_filter(
    qs: QuerySet | None = None,
    *,
    q: str = "",
    labels: Iterable[tuple[str, str | None]] = (),
    hardware: str = "",
    state: str = "",
    online: bool | None = None,
    model: str = "",
    version: str = "",
) -> QuerySet:
    """Devices matching every given criterion.

    labels: (key, value) pairs that must all match, (key, None) for "has this label".
    model: devices that report this model; with version, running that version of it.
    version alone: running that version number of any model.
    """
    qs = Device.objects.all() if qs is None else qs
    if q:
        qs = qs.filter(Q(id__icontains=q) | Q(name__icontains=q))
    for i, (key, value) in enumerate(labels):
        if value is None:
            qs = qs.filter(labels__has_key=key)
        elif connection.vendor == "postgresql":
            # JSON containment can use a GIN index on labels; key transforms cannot.
            qs = qs.filter(labels__contains={key: value})
        else:
            # A key transform of its own, so a key with "__" in it stays one key.
            qs = qs.alias(**{f"label_{i}": KeyTransform(key, "labels")}).filter(**{f"label_{i}": value})
    if hardware:
        qs = qs.filter(hardware_id=hardware)
    if state:
        qs = qs.filter(state=state)
    if online is not None:
        qs = qs.filter(online=online)
    if model or version:
        # EXISTS rather than a join: a device running the version of two models stays one row.
        states = DeviceModelState.objects.filter(device=OuterRef("pk"))
        if model:
            states = states.filter(model__name=model)
        if version:
            states = states.filter(active_version__version=version)
        qs = qs.filter(Exists(states))
    return qs
