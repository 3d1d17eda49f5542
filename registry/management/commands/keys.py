"""`manage.py keys init` creates the release and rollout signing keys (0600 PEMs) unless present;
`manage.py keys show` prints their key ids and public PEMs. With RELEASE_SIGNING=offline only the
rollout key is a file here (release public keys are registered: `fleetctl keys add`)."""

from django.core.management.base import BaseCommand, CommandError

from registry import keys
from registry.errors import ApiError


class Command(BaseCommand):
    help = "Manage the release and rollout signing keys."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True, metavar="{init,show}")
        sub.add_parser("init", help="Create missing key pairs as 0600 PEM files; never overwrites.")
        sub.add_parser("show", help="Print key ids and public keys.")

    def handle(self, *args, action, **options):
        try:
            if action == "init":
                for role, path, created in keys.keys_init():
                    state = "created" if created else "exists, kept"
                    self.stdout.write(f"{role} key: {path} ({state})")
            # The key files only: this command runs before the database exists (deploy/setup).
            for info in (keys.public_key_info(role) for role in keys.file_roles()):
                self.stdout.write(f"{info.role} keyid {info.keyid}  ({info.path})")
                if action == "show":
                    self.stdout.write(info.public_key_pem)
        except ApiError as exc:
            raise CommandError(str(exc.detail)) from None
        except OSError as exc:
            raise CommandError(f"cannot write keys: {exc}") from None
