from django.apps import AppConfig


class OtaConfig(AppConfig):
    name = "ota"
    verbose_name = "Devices and rollouts"

    def ready(self) -> None:
        # Celery's autodiscovery looks for <app>.tasks; the engine's tasks live in ota.rollouts.
        from ota.rollouts import tasks  # noqa: F401
