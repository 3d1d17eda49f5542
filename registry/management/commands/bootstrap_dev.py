"""Local set-up for `make run`: signing keys (if absent) and an admin login. Safe to run again."""

from django.core.management import call_command
from django.core.management.base import BaseCommand

from registry.devsetup import dev_admin_ensure, password_file


class Command(BaseCommand):
    help = "Create the signing keys if absent and an admin superuser; print the login. Idempotent."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--new-password", action="store_true", help="replace the stored password")

    def handle(self, *args, username, new_password, **options):
        call_command("keys", "init", stdout=self.stderr)
        login = dev_admin_ensure(username=username, new_password=new_password)
        state = "created" if login.created else ("reset" if login.reset else "unchanged")
        self.stderr.write(f"admin user {login.username} {state}; password kept in {password_file()}")
        self.stdout.write(f"username: {login.username}\npassword: {login.password}")
