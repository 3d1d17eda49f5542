"""The one settings module. Every knob is an environment variable read through config.env,
which refuses bad values at start-up. See the configuration table in README.md."""

from datetime import timedelta
from pathlib import Path

import dj_database_url
from csp.constants import NONE, SELF

from config.env import ConfigError, env_bool, env_http_header, env_int, env_list, env_path, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = env_path("DATA_DIR", BASE_DIR / "var")

DEBUG = env_bool("DEBUG", False)
# SECRET_KEY, else SECRET_KEY_FILE, else the key `make run` generated into DATA_DIR/secret_key (so
# `manage.py` in any shell signs and reads what make run's processes do), else refuse to start.
SECRET_KEY = env_str("SECRET_KEY", "")
_GENERATED_SECRET_KEY = DATA_DIR / "secret_key"
if not SECRET_KEY and _GENERATED_SECRET_KEY.is_file():
    try:
        SECRET_KEY = _GENERATED_SECRET_KEY.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{_GENERATED_SECRET_KEY}: cannot read the secret key: {exc.strerror}") from None
if not SECRET_KEY:
    if not DEBUG:
        raise ConfigError(
            "SECRET_KEY (or SECRET_KEY_FILE) is required unless DEBUG=true: set one of them, or keep a "
            f"key in {_GENERATED_SECRET_KEY} (`make run` creates it; DATA_DIR={DATA_DIR})"
        )
    SECRET_KEY = "insecure-development-key"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    "registry",
    "ota",
    "web",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Control characters in the URL path, query or web form fields: 400 before any view (registry/guards.py).
    "registry.guards.RequestGuardMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a lockout raised during authentication into the response.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}")
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
except ValueError as exc:  # dj_database_url's message does not say which variable was wrong
    raise ConfigError(f"DATABASE_URL is not a database URL ({exc})") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The embedded default is written by web, worker, beat, ingest (and manage.py) at once. WAL:
    # readers never block the writer nor it them. IMMEDIATE: every transaction takes the write lock
    # when it begins, so it waits for it (up to `timeout` seconds) instead of failing with
    # "database is locked" when a read lock cannot be upgraded. synchronous=NORMAL is durable
    # across application crashes in WAL mode (a power loss may drop the last commits).
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 60,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        **DATABASES["default"].get("OPTIONS", {}),
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []

# --- artifact storage ------------------------------------------------------------------------
ARTIFACT_STORAGE = env_str("ARTIFACT_STORAGE", "filesystem", choices=("filesystem", "s3"))
if ARTIFACT_STORAGE == "s3":
    _artifact_backend = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env_str("S3_BUCKET"),
            "endpoint_url": env_str("S3_ENDPOINT_URL", None),
            "region_name": env_str("S3_REGION", None),
            "access_key": env_str("S3_ACCESS_KEY_ID", None),
            "secret_key": env_str("S3_SECRET_ACCESS_KEY", None),
            "querystring_expire": env_int("S3_PRESIGN_SECONDS", 3600, min_value=60),
            "file_overwrite": False,
            "default_acl": None,
        },
    }
else:
    _artifact_backend = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(env_path("ARTIFACT_DIR", DATA_DIR / "artifacts"))},
    }
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "artifacts": _artifact_backend,
    "staticfiles": {
        "BACKEND": "config.staticfiles.StaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
# Files collectstatic has not seen (no collectstatic before `manage.py runserver`) keep their plain
# names (config/staticfiles.py); WhiteNoise serves those from the apps' static directories.
WHITENOISE_USE_FINDERS = True

# Uploads always spool to disk (never RAM) so a 200 MB model costs the web process nothing.
FILE_UPLOAD_MAX_MEMORY_SIZE = 0
FILE_UPLOAD_TEMP_DIR = str(env_path("UPLOAD_TEMP_DIR", DATA_DIR / "tmp"))
# Django refuses to start when this directory is missing; creating it is the only side effect here.
Path(FILE_UPLOAD_TEMP_DIR).mkdir(parents=True, exist_ok=True)
FILE_UPLOAD_HANDLERS = ["registry.uploads.HashingUploadHandler"]
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 2 * 1024 * 1024, min_value=1024)

# --- signing keys ----------------------------------------------------------------------------
KEYS_DIR = env_path("KEYS_DIR", DATA_DIR / "keys")
RELEASE_KEY_PATH = env_path("RELEASE_KEY_PATH", KEYS_DIR / "release.pem")
ROLLOUT_KEY_PATH = env_path("ROLLOUT_KEY_PATH", KEYS_DIR / "rollout.pem")
RELEASE_VALIDITY_DAYS = env_int("RELEASE_VALIDITY_DAYS", 365, min_value=1)
# offline: the server holds no release private key; releases carry signatures made elsewhere
# (`fleetctl push --sign-with`) by RELEASE_SIGNATURE_THRESHOLD distinct registered release keys.
RELEASE_SIGNING = env_str("RELEASE_SIGNING", "online", choices=("online", "offline"))
RELEASE_SIGNATURE_THRESHOLD = env_int("RELEASE_SIGNATURE_THRESHOLD", 1, min_value=1, max_value=16)
# The offline root key's public half (one or more PEM blocks; registry.keyrings): devices enrolled
# while it is set pin it and take the root-signed keyrings POST /api/v1/keyring/ accepts. Unset: no
# keyrings, devices keep the keys pinned at enrollment (key rotation needs re-enrollment).
ROOT_PUBLIC_KEY_PATH = env_str("ROOT_PUBLIC_KEY_PATH", "")
# Freshness (ota.fleet.timestamps): each device's signed timestamp is valid this long, and Celery
# beat re-signs them every TIMESTAMP_REFRESH_SECONDS (config/celery.py); only with a root key.
TIMESTAMP_VALIDITY_SECONDS = env_int("TIMESTAMP_VALIDITY_SECONDS", 3600, min_value=60, max_value=7 * 86400)

# --- housekeeping (ota/housekeeping.py; Celery beat runs it every HOUSEKEEPING_INTERVAL_SECONDS) ----
# Device events, and directives a newer one superseded, are pruned once older than this many days
# (0: kept forever). The release history (ActiveRelease) and the audit log are never pruned.
EVENT_RETENTION_DAYS = env_int("EVENT_RETENTION_DAYS", 90, min_value=0, max_value=36500)
DIRECTIVE_RETENTION_DAYS = env_int("DIRECTIVE_RETENTION_DAYS", 90, min_value=0, max_value=36500)
# Hours of model metrics (ModelMetricsHour: what the apps reported per device and release).
METRICS_RETENTION_DAYS = env_int("METRICS_RETENTION_DAYS", 30, min_value=0, max_value=36500)
# Rows per DELETE statement, and how long one run may keep deleting before it leaves the rest.
HOUSEKEEPING_BATCH_SIZE = env_int("HOUSEKEEPING_BATCH_SIZE", 1000, min_value=1, max_value=100_000)
HOUSEKEEPING_TIME_BUDGET_SECONDS = env_int("HOUSEKEEPING_TIME_BUDGET_SECONDS", 60, min_value=1,
                                           max_value=3600)

# --- messaging -------------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
# Several deployments (or test runs) sharing one Redis db each need their own queue: a worker
# takes whatever lands on the queue it consumes, whichever database its tasks were meant for.
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_TASK_DEFAULT_QUEUE", "celery")

MQTT_HOST = env_str("MQTT_HOST", "127.0.0.1")
MQTT_PORT = env_int("MQTT_PORT", 1883, min_value=1, max_value=65535)
MQTT_USERNAME = env_str("MQTT_USERNAME", "")
MQTT_PASSWORD = env_str("MQTT_PASSWORD", "")
MQTT_TLS = env_bool("MQTT_TLS", False)
MQTT_TOPIC_ROOT = env_str("MQTT_TOPIC_ROOT", "fleet")
# How devices reach the broker (enrollment writes these into agent.toml); defaults to ours.
MQTT_PUBLIC_HOST = env_str("MQTT_PUBLIC_HOST", MQTT_HOST)
MQTT_PUBLIC_PORT = env_int("MQTT_PUBLIC_PORT", MQTT_PORT, min_value=1, max_value=65535)
MQTT_PUBLIC_TLS = env_bool("MQTT_PUBLIC_TLS", MQTT_TLS)
# dynsec: per-device credentials through Mosquitto's dynamic-security plugin (deploy/mosquitto/);
# none: an anonymous development broker, enrollment registers nothing with it.
MQTT_BROKER_AUTH = env_str("MQTT_BROKER_AUTH", "dynsec", choices=("dynsec", "none"))
# Ingest's MQTT session (ota/transport/subscriber.py). A fixed client id, so the broker keeps
# queueing device messages for the process while it restarts; each process side by side needs its
# own (`mqtt_ingest --instance N` appends -N). Empty: modelfleet-ingest-<hostname>.
MQTT_INGEST_CLIENT_ID = env_str("MQTT_INGEST_CLIENT_ID", "")
# Seconds the broker keeps that session, queueing for it, after the process disconnects or dies.
MQTT_INGEST_SESSION_EXPIRY = env_int("MQTT_INGEST_SESSION_EXPIRY", 86400, min_value=0, max_value=4294967295)

# Lean directives: a device whose agent advertises "release_ref" gets its release envelope by
# reference (sha256, length, URL; it fetches and caches it) instead of inside every retained
# directive. Off: every directive carries the whole envelope, as for agents that predate it.
DIRECTIVE_RELEASE_BY_REFERENCE = env_bool("DIRECTIVE_RELEASE_BY_REFERENCE", True)

# Base URL devices use to reach this server (artifact downloads, enrollment).
PUBLIC_URL = env_str("PUBLIC_URL", f"http://127.0.0.1:{env_int('WEB_PORT', 8000)}").rstrip("/")

# --- behind a TLS-terminating reverse proxy (deploy/nginx/modelfleet.conf) ---------------------
# The request header the proxy sets to "https" when the client came over TLS, e.g.
# X-Forwarded-Proto: Django then treats those requests as secure (CSRF's origin checks, absolute
# URLs). Set it only behind a proxy that overwrites that header on every request, as the shipped
# nginx config does: otherwise any client could claim https. Unset: no such header is trusted.
_PROXY_SSL_HEADER = env_http_header("SECURE_PROXY_SSL_HEADER")
if _PROXY_SSL_HEADER:
    SECURE_PROXY_SSL_HEADER = (_PROXY_SSL_HEADER, "https")
# Session and CSRF cookies only over HTTPS; by default when the public URL is https.
_PUBLIC_HTTPS = PUBLIC_URL.startswith("https://")
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", _PUBLIC_HTTPS)
# No script reads either cookie: htmx sends the CSRF token from the page (hx-headers in
# web/templates/web/base.html), the admin from its forms, the Swagger UI from its init script, which
# the server renders with the token in it. So the CSRF cookie can be HttpOnly too.
SESSION_COOKIE_HTTPONLY = CSRF_COOKIE_HTTPONLY = True
# Lax, not Strict: Strict would drop the session on every link into the UI from elsewhere (a chat,
# a CI log, an alert mail), so the page would ask for a login although one is open. Lax still
# withholds the cookies from cross-site POSTs, forms and fetches, which is what guards against CSRF.
SESSION_COOKIE_SAMESITE = CSRF_COOKIE_SAMESITE = env_str("COOKIE_SAMESITE", "Lax", choices=("Lax", "Strict"))
# HSTS: browsers that saw it once refuse plain http for this host for that long. Sent only on
# https requests (behind a proxy: with SECURE_PROXY_SSL_HEADER set), by default when the public
# URL is https. Subdomains and the preload list stay opt-in: both outlive a change of mind.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000 if _PUBLIC_HTTPS else 0, min_value=0,
                              max_value=63_072_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)

# Content-Security-Policy (django-csp): scripts, styles, images and requests from this origin only;
# no inline script, no eval. Inline style *attributes* stay allowed (style-src-attr): the templates
# use a few for layout (and the progress bars' widths); an attribute cannot select elements nor,
# with img-src 'self', load anything, so it cannot leak the page. <style> elements are refused:
# htmx's own indicator styles are switched off (htmx-config meta tag in base.html), and the API
# docs page is served without its inline <style> and with its init script as a file
# (registry/apidocs.py: drf-spectacular's SpectacularSwaggerSplitView). data: images: the Swagger
# UI's and the admin's icons are inline SVG in their stylesheets.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "style-src-attr": ["'unsafe-inline'"],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}

# --- login throttling (django-axes) --------------------------------------------------------------
# LOGIN_FAILURE_LIMIT wrong passwords for one username from one client address lock that pair out
# of the web and the admin login for LOGIN_LOCKOUT_MINUTES (each further try restarts the wait).
# Other users, and the same user from elsewhere, can still sign in. An admin lifts a lockout with
# `manage.py axes_reset_username NAME` (or axes_reset_ip, axes_reset).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, min_value=1, max_value=1000)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_LOCKOUT_MINUTES", 15, min_value=1, max_value=10080))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "web.login.lockout_response"
AXES_CLIENT_IP_CALLABLE = "web.login.client_ip"
# Behind the shipped nginx config the client's address is the last X-Forwarded-For entry (nginx
# appends it); without this every login would come from the proxy's address. Only behind a proxy
# that appends to that header: otherwise a client could name any address it likes.
LOGIN_TRUST_X_FORWARDED_FOR = env_bool("LOGIN_TRUST_X_FORWARDED_FOR", False)

# --- API ---------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Device tokens (mfd_...) first: the registry app knows nothing of devices.
        "ota.fleet.auth.DeviceTokenAuthentication",
        "registry.auth.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["registry.auth.HasScope"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "registry.errors.json_exception_handler",
    # Size, depth and control-character limits on every body (registry/parsers.py).
    "DEFAULT_PARSER_CLASSES": [
        "registry.parsers.JSONParser",
        "registry.parsers.FormParser",
        "registry.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "registry.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "modelfleet API",
    "DESCRIPTION": "Model registry and rollout service for edge fleets.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI served from the installed sidecar package, so /api/docs/ needs no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Several apps have a "state" field; name the registry's so the schema is stable.
    "ENUM_NAME_OVERRIDES": {
        "VersionStateEnum": "registry.models.ModelVersion.State",
        "DeviceStateEnum": "ota.models.devices.Device.State",
        "RolloutStateEnum": "ota.models.rollouts.Rollout.State",
    },
    # The refusals every operation shares (400, 401, 403, 404, 413, 415) are declared in one place.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "registry.schema.document_errors",
    ],
    # A field that refuses "" says so (minLength 1), so clients and the fuzz test know it.
    "ENFORCE_NON_BLANK_FIELDS": True,
}

# Require a login (a session, or a bearer token of any scope) for /api/schema/ and /api/docs/.
API_DOCS_REQUIRE_LOGIN = env_bool("API_DOCS_REQUIRE_LOGIN", False)

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # axes.apps announces itself at every start (each manage.py command): only its warnings.
    "loggers": {"django.db.backends": {"level": "WARNING"}, "axes.apps": {"level": "WARNING"}},
}
