from django.apps import AppConfig


class OtaConfig(AppConfig):
    name = "ota"
    verbose_name = "Devices and rollouts"

    def ready(self) -> None:
        """Plug the rollout engine into the seams of the layers below it, which never import it:
        operator actions wake it through ota.rollouts.wake, ingest through ota.transport.hooks;
        delta builds go to Celery through ota.rollouts.deltas, and a release asks for its deltas
        through registry.signals.version_released.
        Importing the tasks module here also registers the Celery tasks (Celery's autodiscovery
        looks for <app>.tasks only)."""
        from ota.fleet import schema  # noqa: F401  registers the OpenAPI device-token scheme
        from ota.rollouts import deltas, tasks, wake
        from ota.transport import hooks
        from registry.signals import version_released

        wake.waker_register(tasks.enqueue_evaluation)
        deltas.delta_builder_register(tasks.build_delta.delay)
        version_released.connect(deltas.on_version_released, dispatch_uid="ota-deltas-on-release")
        hooks.device_events_handler_register(tasks.on_device_events)

