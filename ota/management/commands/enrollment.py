"""`manage.py enrollment create --max-uses N [--expires-in 1d] [--label k=v]...` prints a token."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ota.fleet.enrollment import enrollment_token_create, enrollment_token_revoke
from ota.fleet.parsing import parse_label_pairs
from ota.models import EnrollmentToken
from registry.limits import MAX_ENROLLMENT_USES, parse_duration, text_check


class Command(BaseCommand):
    help = "Create, list or revoke device enrollment tokens."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="create a token and print its secret (shown once)")
        create.add_argument("--max-uses", type=int, required=True, help="how many devices may enroll with it")
        create.add_argument("--expires-in", default=None, help="lifetime: 30m, 12h, 1d, 2w (default: never)")
        create.add_argument("--label", action="append", default=[], help="default device label key=value")
        create.add_argument("--name", default="", help="a note saying what the token is for")
        sub.add_parser("list", help="list tokens")
        revoke = sub.add_parser("revoke", help="revoke a token by id")
        revoke.add_argument("id", type=int)

    def handle(self, *args, action, **options):
        if action == "create":
            if options["max_uses"] < 1:
                raise CommandError("--max-uses must be at least 1")
            if options["max_uses"] > MAX_ENROLLMENT_USES:
                raise CommandError(f"--max-uses must be at most {MAX_ENROLLMENT_USES}")
            try:
                text_check(options["name"], where="--name")
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            try:
                expires_in = parse_duration(options["expires_in"]) if options["expires_in"] else None
            except ValueError as exc:
                raise CommandError(f"--expires-in: {exc}") from None
            try:
                labels = parse_label_pairs(options["label"])
            except ValueError as exc:
                raise CommandError(f"--label: {exc}") from None
            _token, secret = enrollment_token_create(
                max_uses=options["max_uses"], expires_in=expires_in, labels=labels, name=options["name"],
                created_by="cli",
            )
            self.stdout.write(secret)
        elif action == "list":
            for token in EnrollmentToken.objects.order_by("id"):
                state = "revoked" if token.revoked_at else "active"
                expires = token.expires_at.isoformat() if token.expires_at else "never"
                self.stdout.write(
                    f"{token.id}\t{token.prefix}…\t{token.uses}/{token.max_uses}\t{state}\texpires {expires}\t"
                    f"{token.default_labels}\t{token.name}"
                )
        else:
            try:
                enrollment_token_revoke(token_id=options["id"], actor="cli")
            except EnrollmentToken.DoesNotExist:
                raise CommandError(f"no enrollment token with id {options['id']}") from None
            self.stdout.write(f"revoked enrollment token {options['id']}")
