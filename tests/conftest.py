"""Shared fixtures: isolated storage and keys, and the named principals every feature test uses
(an operator, a viewer, a CI token, and — with the rollout service — a device of another fleet)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.signing import generate_private_key_pem

# --- parallel runs (scripts/test.sh: pytest-xdist, --dist loadgroup) -----------------------------


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """On xdist's workers (`--dist loadgroup`, which hands each free worker the next test):
    - a module whose tests share a module-scoped fixture (an agent installed once, an S3 endpoint)
      is one work unit, so its tests keep their order and the fixture is set up once, not once
      per worker that gets a few of them (marked here, before xdist's own hook reads the marks);
    - the longest tests come first (end-to-end runs marked slow, then those with servers, agents
      or a browser, then the rest), so no worker starts a minute-long test when the others have
      nothing left to do. Serial runs keep pytest-django's order."""
    loadgroup = getattr(config.option, "loadgroup", False)  # set on xdist's workers only
    if loadgroup:
        for item in items:
            if any(defs and defs[-1].scope in ("module", "class")
                   for defs in item._fixtureinfo.name2fixturedefs.values()):
                item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    result = yield
    if loadgroup:
        items.sort(key=_expected_length)
    return result


_HEAVY_FIXTURES = {"transactional_db", "live_server", "server_platform", "secure_broker", "mosquitto", "rig"}


def _expected_length(item) -> int:
    """0 for the end-to-end tests (minutes), 1 for tests running servers, agents or a browser
    (seconds), 2 for the rest (milliseconds)."""
    if item.get_closest_marker("slow"):
        return 0
    if (item.get_closest_marker("browser") or item.get_closest_marker("xdist_group")
            or _HEAVY_FIXTURES & set(item.fixturenames)):
        return 1
    return 2


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory):
    keys_dir = tmp_path_factory.mktemp("keys")
    for role in ("release", "rollout"):
        path = keys_dir / f"{role}.pem"
        path.write_bytes(generate_private_key_pem())
        path.chmod(0o600)
    return keys_dir


@pytest.fixture(scope="session", autouse=True)
def static_root_exists():
    """whitenoise warns on every request when STATIC_ROOT is missing (no collectstatic in tests)."""
    from pathlib import Path

    from django.conf import settings

    Path(settings.STATIC_ROOT).mkdir(parents=True, exist_ok=True)


@pytest.fixture(autouse=True)
def isolated_storage(settings, tmp_path, signing_keys):
    """Each test gets its own artifact store and the session's signing keys."""
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "artifacts")},
        },
    }
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "upload-tmp")
    (tmp_path / "upload-tmp").mkdir()
    settings.KEYS_DIR = signing_keys
    settings.RELEASE_KEY_PATH = signing_keys / "release.pem"
    settings.ROLLOUT_KEY_PATH = signing_keys / "rollout.pem"
    return tmp_path / "artifacts"


@dataclass
class Token:
    secret: str
    scope: str

    @property
    def headers(self) -> dict[str, str]:
        return {"HTTP_AUTHORIZATION": f"Bearer {self.secret}"}

    @property
    def http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def _token(scope: str) -> Token:
    from registry.models import ApiToken

    secret = ApiToken.new_secret()
    ApiToken.objects.create(
        name=f"test-{scope}", scope=scope, prefix=secret[:8], token_hash=ApiToken.hash_secret(secret)
    )
    return Token(secret=secret, scope=scope)


@pytest.fixture
def ci_token(db) -> Token:
    return _token("ci")


@pytest.fixture
def read_token(db) -> Token:
    return _token("read")


@pytest.fixture
def operator_token(db) -> Token:
    return _token("operator")


@pytest.fixture
def admin_token(db) -> Token:
    return _token("admin")


def _user(username: str, group: str):
    from django.contrib.auth.models import Group, User

    user = User.objects.create_user(username=username, password=f"{username}-password-123")
    user.groups.add(Group.objects.get_or_create(name=group)[0])
    return user


@pytest.fixture
def operator(db):
    return _user("olivia-operator", "operator")


@pytest.fixture
def viewer(db):
    return _user("victor-viewer", "viewer")


@pytest.fixture
def other_fleet_device(db, settings, request):
    """A device enrolled for another fleet (labels fleet=other, hardware rpi4-arm64): its API token
    may fetch manifests and the artifacts of releases directed to it, nothing about other devices
    or rollouts. Row and token
    only unless the test also uses `secure_broker`; `.device`, `.api_token`, `.headers`."""
    from types import SimpleNamespace

    from tests.support.fleet import enroll_device

    if "secure_broker" not in request.fixturenames:
        settings.MQTT_BROKER_AUTH = "none"
    enrolled = enroll_device(labels={"fleet": "other"}, name="other-fleet-1")
    return SimpleNamespace(device=enrolled.device, api_token=enrolled.api_token,
                           headers={"HTTP_AUTHORIZATION": f"Bearer {enrolled.api_token}"})


@pytest.fixture
def mosquitto(tmp_path):
    """A private anonymous Mosquitto on a free port (stop()/start() to simulate outages)."""
    from tests.support.mosquitto import Mosquitto

    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture
def secure_broker(tmp_path, settings):
    """A private Mosquitto with the deploy/ security config (dynamic security, anonymous off)
    on a free port. Django settings already point at it (service account); `.env` holds the
    same as environment variables for subprocesses, `.username`/`.password` the service account."""
    from tests.support.broker_auth import start_secure_broker

    broker = start_secure_broker(tmp_path / "secure-broker")
    broker.apply(settings)
    yield broker
    broker.stop()


@pytest.fixture(autouse=True)
def plain_static_storage(settings):
    """Tests render pages without running collectstatic: the manifest storage production uses
    would refuse every {% static %} tag, so serve straight from the app and vendor folders."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def server_platform(transactional_db, live_server, secure_broker, tmp_path):
    """The real server processes on the test database, for end-to-end tests: `mqtt_ingest`, one
    Celery worker (-P solo) and Celery beat (1 s rollout tick), all on `secure_broker`, with
    directive artifact URLs pointing at `live_server`. Celery uses Redis at $TEST_REDIS_URL
    (default redis://127.0.0.1:6379/4), on a queue of its own. See tests/support/platform.py for
    start_worker()/kill_worker()/logs()/peak_rss_kb() and the DirectiveRecorder."""
    from tests.support.platform import Platform

    # Platform's default Redis URL is already $TEST_REDIS_URL (tests/support/platform.py).
    with Platform(tmp_path, broker=secure_broker, live_server_url=live_server.url) as platform:
        platform.start_ingest()
        platform.start_worker()
        platform.start_beat()
        yield platform


@pytest.fixture
def rig(mosquitto, tmp_path):
    """An agent test rig: private broker, Range-capable artifact server, test keys, a subscriber."""
    from tests.support.agent_harness import ArtifactServer, Keys, Rig, Subscriber

    server = ArtifactServer().start()
    subscriber = Subscriber(mosquitto.port).start()
    rig = Rig(broker=mosquitto, server=server, keys=Keys.generate(), subscriber=subscriber, tmp=tmp_path)
    yield rig
    rig.close()
    subscriber.stop()
    server.stop()
