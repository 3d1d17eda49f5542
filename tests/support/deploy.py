"""The production recipe of deploy/, run for real without systemd: unit files read the way
systemd reads them (their ExecStart command lines, Environment= and EnvironmentFile=), the env
file example turned into a test installation's, Mosquitto started from production.conf and
nginx from deploy/nginx/modelfleet.conf, each with ports, names and paths of this machine.

Every rewrite of a shipped file asserts that what it replaces is there, so a change to the
recipe that the tests no longer exercise fails loudly instead of silently testing something else.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT_DIR = DEPLOY / "systemd"
ENV_EXAMPLE = DEPLOY / "modelfleet.env.example"
INSTALL_ROOT = "/opt/modelfleet"  # the checkout in the units, README.md "Production"
SERVICES = ("web", "worker", "beat", "ingest")
# What systemd gives a service besides its own settings (systemd.exec(5), "Environment Variables
# in Spawned Processes"): nothing from the shell that started the test.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


# --- unit files ------------------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} in file order, repeated keys kept (systemd's own syntax:
    comments start with # or ;, a trailing backslash continues the line)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: not a unit file line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def unit_value(unit: dict, section: str, key: str) -> str:
    values = unit_values(unit, section, key)
    assert len(values) == 1, f"expected one {key}= in [{section}], found {values}"
    return values[0]


def service_unit(name: str) -> dict:
    return read_unit(UNIT_DIR / f"modelfleet-{name}.service")


def unit_variables(unit: dict) -> set[str]:
    """Variables the command lines take from the environment: ${NAME} and $NAME."""
    names = set()
    for key in ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecReload", "ExecStop"):
        for value in unit_values(unit, "Service", key):
            names.update(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value))
            names.update(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", value))
    return names - {"MAINPID"}  # set by systemd itself


def expand_command(line: str, env: dict[str, str]) -> list[str]:
    """An Exec line as systemd runs it: split like a shell word list, ${NAME} replaced inside a
    word, a word that is exactly $NAME split on whitespace (systemd.service(5), "Command lines")."""
    assert "%" not in line, f"specifiers are not expanded here: {line}"
    line = line.lstrip("-@:+!")  # prefixes (none used today)
    words = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            words.extend(env.get(whole.group(1), "").split())
            continue
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return words


# --- the env file ------------------------------------------------------------------------------------


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=value lines the way systemd's EnvironmentFile= reads them: # and ; comments, optional
    single or double quotes around the value."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"not KEY=value: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def documented_variables(text: str) -> dict[str, bool]:
    """{NAME: set (True) or only shown commented out (False)} for every KEY=value line."""
    found: dict[str, bool] = {}
    for raw in text.splitlines():
        match = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=.*", raw.strip())
        if match:
            found[match.group(2)] = found.get(match.group(2), False) or not match.group(1)
    return found


def env_file_with(text: str, **values: str) -> str:
    """The example with these settings given (set, or uncommented and set); each must be in it."""
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^#?{key}=.*$", lambda _m, k=key, v=value: f"{k}={v}", text)
        assert count == 1, f"{key} is not (exactly once) in {ENV_EXAMPLE.name}"
    return text


# --- shipped configs with this machine's ports and paths ---------------------------------------------------


def replace_once(text: str, pattern: str, replacement: str, *, what: str, count: int = 1) -> str:
    new, found = re.subn(pattern, lambda _m: replacement, text, flags=re.MULTILINE)
    assert found == count, f"{what}: expected {count} match(es) of {pattern!r}, found {found}"
    return new


def mosquitto_production_config(
    *, plain_port: int, tls_port: int, tls: dict[str, Path], workdir: Path, plugin: str
) -> Path:
    """The production layout in `workdir`: production.conf as the main file, the policy
    (mosquitto.conf) in its conf.d/. Returns the main file's path."""
    what = "production.conf"
    text = (DEPLOY / "mosquitto" / "production.conf").read_text()
    text = replace_once(
        text, r"^include_dir /etc/mosquitto/conf\.d$", f"include_dir {workdir / 'conf.d'}", what=what
    )
    text = replace_once(text, r"^listener 1883 127\.0\.0\.1$", f"listener {plain_port} 127.0.0.1", what=what)
    text = replace_once(text, r"^listener 8883$", f"listener {tls_port} 127.0.0.1", what=what)
    text = replace_once(text, r"^certfile .*$", f"certfile {tls['cert']}", what=what)
    text = replace_once(text, r"^keyfile .*$", f"keyfile {tls['key']}", what=what)
    text = replace_once(text, r"^pid_file .*$", f"pid_file {workdir / 'mosquitto.pid'}", what=what)
    text = replace_once(text, r"^log_dest .*$", f"log_dest file {workdir / 'mosquitto.log'}", what=what)
    # As root, Mosquitto would switch to the mosquitto user, who cannot read the test's temp dir.
    main = workdir / "mosquitto.conf"
    main.write_text(text + "\nuser root\n")
    what = "mosquitto.conf"
    policy = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    policy = replace_once(policy, r"^plugin .*$", f"plugin {plugin}", what=what)
    policy = replace_once(
        policy,
        r"^plugin_opt_config_file .*$",
        f"plugin_opt_config_file {workdir / 'dynamic-security.json'}",
        what=what,
    )
    policy = replace_once(policy, r"^persistence_location .*$", f"persistence_location {workdir}/", what=what)
    (workdir / "conf.d").mkdir(exist_ok=True)
    (workdir / "conf.d" / "modelfleet.conf").write_text(policy)
    return main


def nginx_config(
    *, https_port: int, http_port: int, web_port: int, tls: dict[str, Path], workdir: Path
) -> str:
    """deploy/nginx/modelfleet.conf inside a minimal nginx.conf of its own (Debian's wraps it in
    /etc/nginx/nginx.conf's http block the same way)."""
    site = (DEPLOY / "nginx" / "modelfleet.conf").read_text()
    what = "deploy/nginx/modelfleet.conf"
    site = replace_once(site, r"^\s*listen 80;$", f"    listen 127.0.0.1:{http_port};", what=what)
    site = replace_once(site, r"^\s*listen 443 ssl;$", f"    listen 127.0.0.1:{https_port} ssl;", what=what)
    site = replace_once(site, r"^\s*listen \[::\]:(80|443)( ssl)?;$", "", what=what, count=2)
    site = replace_once(
        site, r"server_name fleet\.example\.com;", "server_name localhost;", what=what, count=2
    )
    site = replace_once(site, r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{web_port};", what=what)
    site = replace_once(site, r"ssl_certificate \S+;", f"ssl_certificate {tls['cert']};", what=what)
    site = replace_once(site, r"ssl_certificate_key \S+;", f"ssl_certificate_key {tls['key']};", what=what)
    site = replace_once(site, r"root /var/www/html;", f"root {workdir / 'www'};", what=what)
    (workdir / "site.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        "daemon off;\n"
        "worker_processes 1;\n"
        # As root the workers would run as nobody, who cannot write the test's temp dir.
        "user root;\n"
        f"pid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {workdir / 'access.log'};\n"
        f"{temp}\n"
        f"    include {workdir / 'site.conf'};\n"
        "}\n"
    )


# --- processes --------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Processes:
    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path | str = REPO) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"===== {p.name} (exit {p.popen.poll()}) =====\n{p.log()[-tail:]}" for p in self.procs
        )


def service_process(
    name: str, env_file: Path, *, extra_env: dict[str, str] | None = None
) -> tuple[list[str], dict, str]:
    """(argv, environment, working directory) of modelfleet-NAME.service for this checkout: its
    ExecStart with the env file's values, the environment systemd would give it."""
    unit = service_unit(name)

    def local(value: str) -> str:
        return value.replace(INSTALL_ROOT, str(REPO))

    env_file_path = unit_value(unit, "Service", "EnvironmentFile")
    assert env_file_path == "/etc/modelfleet/modelfleet.env", env_file_path
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "HOME": str(env_file.parent)}
    env.update(parse_env_file(env_file.read_text()))
    for assignment in unit_values(unit, "Service", "Environment"):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            env[key] = local(value)
    env.update(extra_env or {})
    argv = [local(word) for word in expand_command(unit_value(unit, "Service", "ExecStart"), env)]
    return argv, env, local(unit_value(unit, "Service", "WorkingDirectory"))
