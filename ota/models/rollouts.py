"""Rollouts, waves, per-device assignments and the directives sent for them."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

__all__ = ["Directive", "Rollout", "RolloutDevice", "Wave"]


class Rollout(models.Model):
    class State(models.TextChoices):
        CREATED = "created"  # planned, waiting for start (and approval when required)
        # Started with a start_at still ahead: the engine's tick starts it then (ota.rollouts.schedule).
        SCHEDULED = "scheduled"
        RUNNING = "running"
        PAUSED = "paused"
        COMPLETED = "completed"
        ABORTED = "aborted"  # stopped; with abort_policy=revert the updated devices were sent back
        ROLLED_BACK = "rolled_back"  # an operator sent every updated device back to its previous release

    class AbortPolicy(models.TextChoices):
        PAUSE = "pause"
        ABORT = "abort"
        REVERT = "revert"

    # States in which the engine drives a rollout's devices.
    ACTIVE_STATES = (State.RUNNING, State.PAUSED)
    # States in which a rollout "owns" its devices for its model (a device is never in two): a
    # scheduled rollout holds them from the moment it is scheduled, so its start cannot conflict.
    OWNING_STATES = (State.SCHEDULED, *ACTIVE_STATES)
    OPEN_STATES = (State.CREATED, *OWNING_STATES)

    name = models.CharField(max_length=200, blank=True)
    release = models.ForeignKey("registry.ModelVersion", on_delete=models.PROTECT, related_name="rollouts")
    # Denormalised from release so "one running rollout per device and model" is one query.
    model = models.ForeignKey("registry.Model", on_delete=models.PROTECT, related_name="rollouts")
    state = models.CharField(max_length=16, choices=State.choices, default=State.CREATED, db_index=True)
    # The definition exactly as accepted (validated and normalised), kept for audit and display.
    target = models.JSONField(default=dict)
    waves_spec = models.JSONField(default=list)
    gates = models.JSONField(default=dict)
    abort_policy = models.CharField(max_length=8, choices=AbortPolicy.choices, default=AbortPolicy.PAUSE)
    requires_approval = models.BooleanField(default=False)
    # Keep following the target: devices that start matching it (enrolled, relabelled) after the
    # last wave passed get the release in a catch-up wave (continuous deployment to a label).
    follow_target = models.BooleanField(default=False)
    # When late joiners were last looked for (ota.rollouts.joiners): the target is resolved again
    # at most every JOIN_CHECK_SECONDS.
    target_checked_at = models.DateTimeField(null=True, blank=True)
    # Target devices that match labels/hardware but have no artifact for their hardware.
    incompatible = models.JSONField(default=list, blank=True)
    current_wave = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150, blank=True)
    approved_at = models.DateTimeField(null=True, blank=True)
    approved_by = models.CharField(max_length=150, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    started_by = models.CharField(max_length=150, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    reverted_at = models.DateTimeField(null=True, blank=True)
    state_reason = models.TextField(blank=True)
    # Maintenance windows (agent.windows texts; ota.rollouts.definition.windows_validate): a device
    # activates only while one is open, by its own clock. `label_windows`: [{labels, windows}], the
    # first group whose labels a device has gives it that group's windows instead of `windows`.
    windows = models.JSONField(default=list, blank=True)
    label_windows = models.JSONField(default=list, blank=True)
    # When a started rollout begins sending (None: at once). Starting it earlier schedules it.
    start_at = models.DateTimeField(null=True, blank=True)
    # Last time the engine evaluated it (for operators and tests: the beat tick evaluates every
    # running rollout whatever this says).
    evaluated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["model", "state"])]

    def __str__(self) -> str:
        return f"rollout {self.pk} {self.release} ({self.state})"


class Wave(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"  # directives going out (rate-capped), outcomes arriving
        SOAKING = "soaking"  # success gate met; waiting out the soak time
        PASSED = "passed"
        HALTED = "halted"  # failure gate tripped (or the rollout was aborted during it)

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="waves")
    index = models.PositiveIntegerField()
    spec = models.JSONField(default=dict)
    # Effective gates for this wave: rollout gates with the wave's own overrides applied.
    gates = models.JSONField(default=dict)
    size = models.PositiveIntegerField(default=0)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    started_at = models.DateTimeField(null=True, blank=True)
    gate_met_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["rollout", "index"]
        constraints = [models.UniqueConstraint(fields=["rollout", "index"], name="unique_wave_index")]

    def __str__(self) -> str:
        return f"rollout {self.rollout_id} wave {self.number}"

    @property
    def number(self) -> int:
        """The wave's place as people count it (from 1); `index` (from 0) is the API's and the engine's."""
        return self.index + 1


class RolloutDevice(models.Model):
    """One device's place in a rollout: its wave, where its update stands, and when each phase began."""

    class State(models.TextChoices):
        PLANNED = "planned"  # in a wave that has not started
        QUEUED = "queued"  # its wave started; waiting for the rate cap
        DIRECTED = "directed"  # directive signed and published, nothing heard yet
        # Never picked up its directive within the delivery timeout (typically offline). Neither
        # healthy nor failed: left out of the success gate's count; its directive stays, so it
        # still converges when it comes back, and what it reports then is recorded.
        UNREACHABLE = "unreachable"
        RECEIVED = "received"
        DOWNLOADING = "downloading"
        VERIFYING = "verifying"
        PRECHECKING = "prechecking"
        # Downloaded, verified and prechecked; activates when its maintenance window opens
        # (window_opens_at, as the device reported it). Neither failed nor stalled.
        WAITING_FOR_WINDOW = "waiting_for_window"
        ACTIVATING = "activating"
        TRIAL = "trial"
        COMMITTED = "committed"  # healthy after activation: the only success
        UNHEALTHY = "unhealthy"  # committed, but the health it reported breaks the rollout's health gate
        FAILED = "failed"  # failed before activation (current model untouched)
        ROLLED_BACK = "rolled_back"  # activated, failed its trial, went back by itself
        REJECTED = "rejected"  # refused the directive
        TIMED_OUT = "timed_out"  # a phase outlived its timeout
        SKIPPED = "skipped"  # never sent: the rollout stopped before its turn
        REVERTING = "reverting"  # sent back to its previous release
        REVERTED = "reverted"
        REVERT_FAILED = "revert_failed"

    # State groups: the one definition the engine, the gates, the API, the web UI, the admin and
    # (through the API's counts) fleetctl use. A test checks every state is in the groups it
    # should be and in exactly one progress bucket.
    WAITING = (State.PLANNED, State.QUEUED)  # nothing sent yet
    IN_FLIGHT = (
        State.DIRECTED, State.RECEIVED, State.DOWNLOADING, State.VERIFYING,
        State.PRECHECKING, State.WAITING_FOR_WINDOW, State.ACTIVATING, State.TRIAL,
    )
    # Update failures: what the failure gate counts and what "retry failed" sends again.
    FAILURES = (State.FAILED, State.ROLLED_BACK, State.REJECTED, State.TIMED_OUT, State.UNHEALTHY)
    # What an operator must look at, by error code: the update failures and failed reverts.
    PROBLEMS = (*FAILURES, State.REVERT_FAILED)
    # May be running the new release (or about to): a revert sends these back.
    TOUCHED = (*IN_FLIGHT, State.COMMITTED, State.TIMED_OUT, State.UNHEALTHY)
    # A report from the device is awaited: its update or its revert is under way, or it may still
    # pick up its directive.
    EXPECTING_REPORTS = (*IN_FLIGHT, State.UNREACHABLE, State.REVERTING)
    # Its directive is out but not picked up: withdrawn when the rollout stops.
    NOT_PICKED_UP = (State.DIRECTED, State.UNREACHABLE)
    # Nothing more is expected from the device for this rollout (late reports never flip these).
    FINISHED = (State.COMMITTED, *FAILURES, State.SKIPPED, State.REVERTED, State.REVERT_FAILED)
    # Progress buckets, in pipeline order: (key, label, states). The rollout page shows these;
    # the web adds an "offline" overlay for devices in flight whose box is offline.
    PROGRESS_BUCKETS = (
        ("pending", "pending", WAITING),
        ("downloading", "downloading", (State.DIRECTED, State.RECEIVED, State.DOWNLOADING, State.VERIFYING)),
        ("prechecking", "prechecking", (State.PRECHECKING,)),
        ("waiting_for_window", "waiting for window", (State.WAITING_FOR_WINDOW,)),
        ("in_trial", "in trial", (State.ACTIVATING, State.TRIAL)),
        ("healthy", "healthy", (State.COMMITTED,)),
        ("failed", "failed", (State.FAILED, State.REJECTED, State.UNHEALTHY, State.REVERT_FAILED)),
        ("timed_out", "timed out", (State.TIMED_OUT,)),
        ("unreachable", "unreachable", (State.UNREACHABLE,)),
        ("reverting", "reverting", (State.REVERTING,)),
        ("rolled_back", "rolled back", (State.ROLLED_BACK, State.REVERTED)),
        ("skipped", "skipped", (State.SKIPPED,)),
    )
    # Agent-reported update states mapped onto assignment states (protocol State values).
    FROM_EVENT = {
        "received": State.RECEIVED,
        "downloading": State.DOWNLOADING,
        "verifying": State.VERIFYING,
        "prechecking": State.PRECHECKING,
        "waiting_for_window": State.WAITING_FOR_WINDOW,
        "activating": State.ACTIVATING,
        "trial": State.TRIAL,
        "committed": State.COMMITTED,
        "failed": State.FAILED,
        "rolled_back": State.ROLLED_BACK,
        "rejected": State.REJECTED,
    }

    @classmethod
    def group_counts(cls, counts) -> dict[str, int]:
        """Per-state counts ({state: n}) summed by group: committed, failed, in_flight, waiting,
        unreachable, skipped, and waiting_for_window (in flight too: downloaded, waiting to activate)."""
        return {
            "committed": counts.get(cls.State.COMMITTED, 0),
            "failed": sum(counts.get(s, 0) for s in cls.FAILURES),
            "in_flight": sum(counts.get(s, 0) for s in cls.IN_FLIGHT),
            "waiting": sum(counts.get(s, 0) for s in cls.WAITING),
            "unreachable": counts.get(cls.State.UNREACHABLE, 0),
            "skipped": counts.get(cls.State.SKIPPED, 0),
            "waiting_for_window": counts.get(cls.State.WAITING_FOR_WINDOW, 0),
        }

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="assignments")
    wave = models.ForeignKey(Wave, on_delete=models.CASCADE, related_name="assignments")
    device = models.ForeignKey("ota.Device", on_delete=models.CASCADE, related_name="rollout_assignments")
    # Position in the stable hash order (sha256 of rollout id and device id).
    rank = models.PositiveIntegerField()
    state = models.CharField(max_length=24, choices=State.choices, default=State.PLANNED, db_index=True)
    seq = models.PositiveBigIntegerField(null=True, blank=True, help_text="seq of the update directive")
    revert_seq = models.PositiveBigIntegerField(null=True, blank=True)
    # What the device ran before this rollout touched it, for revert.
    previous_version = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    previous_sha256 = models.CharField(max_length=64, blank=True)
    error_code = models.CharField(max_length=32, blank=True)
    detail = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    queued_at = models.DateTimeField(null=True, blank=True)
    directed_at = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(null=True, blank=True)
    download_started_at = models.DateTimeField(null=True, blank=True)
    verify_started_at = models.DateTimeField(null=True, blank=True)
    activate_started_at = models.DateTimeField(null=True, blank=True)
    trial_started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    revert_directed_at = models.DateTimeField(null=True, blank=True)
    # A failed revert is tried again with backoff (ota.rollouts.reconcile) a few times.
    revert_attempts = models.PositiveIntegerField(default=0)
    # An operator's retry of a device that rolled back (or refused a deny-listed artifact): its
    # next directive says, signed, that the artifact may be tried again.
    lift_denylist = models.BooleanField(default=False)
    revert_retry_at = models.DateTimeField(null=True, blank=True)
    reverted_at = models.DateTimeField(null=True, blank=True)
    last_event_no = models.BigIntegerField(default=-1)
    # How the artifact reached the device ("delta" or "full", blank until it says) and the bytes it
    # fetched for it; a delta device saved the artifact's length less these.
    delivery = models.CharField(max_length=8, blank=True)
    bytes_downloaded = models.BigIntegerField(null=True, blank=True)
    # waiting_for_window: when its next maintenance window opens, as the device last reported it
    # (its own clock). The activate timeout counts from here (ota.rollouts.timeouts).
    window_opens_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["rollout", "rank"]
        constraints = [
            models.UniqueConstraint(fields=["rollout", "device"], name="one_assignment_per_rollout_device")
        ]
        indexes = [models.Index(fields=["wave", "state"]), models.Index(fields=["device", "seq"])]

    def __str__(self) -> str:
        return f"{self.device_id} in rollout {self.rollout_id}: {self.state}"


class Directive(models.Model):
    """Every directive ever signed: which device, which seq, for what, and when it went out."""

    class Kind(models.TextChoices):
        UPDATE = "update"
        REVERT = "revert"

    device = models.ForeignKey("ota.Device", on_delete=models.CASCADE, related_name="directives")
    seq = models.PositiveBigIntegerField()
    rollout = models.ForeignKey(Rollout, null=True, blank=True, on_delete=models.SET_NULL, related_name="directives")
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.UPDATE)
    version = models.ForeignKey("registry.ModelVersion", on_delete=models.PROTECT, related_name="+")
    payload_sha256 = models.CharField(max_length=64)
    # The signed envelope exactly as published, so an unpublished one (worker died between
    # commit and publish) goes out later byte for byte, with the same seq.
    envelope = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)
    # When it last went out (NULL: to publish, or publish again). A withdrawn directive goes out
    # as an empty retained message, clearing its topic; the beat tick retries both until they stick.
    published_at = models.DateTimeField(null=True, blank=True)
    withdrawn_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [models.UniqueConstraint(fields=["device", "seq"], name="unique_directive_seq")]
        indexes = [
            models.Index(fields=["created_at"], condition=Q(published_at__isnull=True), name="directive_unpublished")
        ]

    def __str__(self) -> str:
        return f"directive {self.device_id}#{self.seq} ({self.kind})"
