"""API tokens for CI and scripts: `tokens create --name N --scope S [--expires-in 90d]` (prints
the secret once), `tokens list` (with expiry and last use), `tokens revoke NAME`."""

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from registry.errors import ApiError
from registry.limits import parse_duration
from registry.models import ApiToken
from registry.tokens import token_create, token_revoke

ACTOR = "cli:manage.py"


class Command(BaseCommand):
    help = "Create, list and revoke API bearer tokens."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True, metavar="{create,list,revoke}")
        create = sub.add_parser("create", help="Create a token and print its secret (shown only once).")
        create.add_argument("--name", required=True)
        create.add_argument("--scope", required=True, choices=[choice.value for choice in ApiToken.Scope])
        create.add_argument("--expires-in", default=None, metavar="DURATION",
                            help="e.g. 12h, 90d, 52w (at most ten years); default: never expires.")
        listing = sub.add_parser("list", help="List tokens (never their secrets).")
        listing.add_argument("--all", action="store_true", help="Include revoked tokens.")
        revoke = sub.add_parser("revoke", help="Revoke every active token with this name.")
        revoke.add_argument("name")

    def handle(self, *args, action, **options):
        try:
            if action == "create":
                try:
                    expires_in = parse_duration(options["expires_in"]) if options["expires_in"] else None
                except ValueError as exc:
                    raise CommandError(f"--expires-in: {exc}") from None
                token, secret = token_create(
                    name=options["name"], scope=options["scope"], actor=ACTOR, expires_in=expires_in
                )
                # The secret alone on stdout, so `TOKEN=$(manage.py tokens create ...)` works.
                self.stdout.write(secret)
                expiry = f"expires {_when(token.expires_at)}" if token.expires_at else "never expires"
                self.stderr.write(
                    f"created {token.scope} token '{token.name}' ({expiry}); store it now, it is not shown again"
                )
            elif action == "list":
                tokens = ApiToken.objects.order_by("name", "created_at")
                if not options["all"]:
                    tokens = tokens.filter(revoked_at__isnull=True)
                now = timezone.now()
                self.stdout.write(
                    f"{'NAME':<24} {'SCOPE':<9} {'PREFIX':<9} {'CREATED':<20} {'EXPIRES':<28} "
                    f"{'LAST USED':<20} REVOKED"
                )
                for t in tokens:
                    expires = _when(t.expires_at) + (" (expired)" if t.is_expired(now) else "")
                    self.stdout.write(
                        f"{t.name:<24} {t.scope:<9} {t.prefix:<9} {_when(t.created_at):<20} {expires:<28} "
                        f"{_when(t.last_used_at):<20} {_when(t.revoked_at)}"
                    )
            else:
                count = token_revoke(name=options["name"], actor=ACTOR)
                self.stdout.write(f"revoked {count} token(s) named '{options['name']}'")
        except ApiError as exc:
            raise CommandError(str(exc.detail)) from None


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"
