"""API tokens for CI and scripts: `tokens create --name N --scope S` (prints the secret once),
`tokens list`, `tokens revoke NAME`."""

from django.core.management.base import BaseCommand, CommandError

from registry.errors import ApiError
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
        listing = sub.add_parser("list", help="List tokens (never their secrets).")
        listing.add_argument("--all", action="store_true", help="Include revoked tokens.")
        revoke = sub.add_parser("revoke", help="Revoke every active token with this name.")
        revoke.add_argument("name")

    def handle(self, *args, action, **options):
        try:
            if action == "create":
                token, secret = token_create(name=options["name"], scope=options["scope"], actor=ACTOR)
                # The secret alone on stdout, so `TOKEN=$(manage.py tokens create ...)` works.
                self.stdout.write(secret)
                self.stderr.write(
                    f"created {token.scope} token '{token.name}'; store it now, it is not shown again"
                )
            elif action == "list":
                tokens = ApiToken.objects.order_by("name", "created_at")
                if not options["all"]:
                    tokens = tokens.filter(revoked_at__isnull=True)
                self.stdout.write(
                    f"{'NAME':<24} {'SCOPE':<9} {'PREFIX':<9} {'CREATED':<20} {'LAST USED':<20} REVOKED"
                )
                for t in tokens:
                    self.stdout.write(
                        f"{t.name:<24} {t.scope:<9} {t.prefix:<9} {t.created_at:%Y-%m-%d %H:%M:%S}  "
                        f"{t.last_used_at.strftime('%Y-%m-%d %H:%M:%S') if t.last_used_at else '-':<20} "
                        f"{t.revoked_at.strftime('%Y-%m-%d %H:%M:%S') if t.revoked_at else '-'}"
                    )
            else:
                count = token_revoke(name=options["name"], actor=ACTOR)
                self.stdout.write(f"revoked {count} token(s) named '{options['name']}'")
        except ApiError as exc:
            raise CommandError(str(exc.detail)) from None
