"""The fleet ledger behind a password, an ACL user and TLS, against Debian's real redis-server
(started here on free 127.0.0.1 ports, stopped by PID; TLS certificates made here with the
`openssl` CLI: a private CA, a server certificate for 127.0.0.1/localhost, a client one).

- The uploader's ledger takes its credentials from the environment only
  (TRITON_AL_LEDGER_PASSWORD, _USERNAME, _CA, _CERT, _KEY), connects over redis:// and
  rediss://, and a refused or missing password, an untrusted certificate, a missing client
  certificate or the wrong scheme for the port is reported naming what to check, without a
  traceback; the real `triton-al uploader` holds its items meanwhile (none dropped) and
  delivers them once the password is right.
- The Redis of deploy/kubernetes/components/ledger starts from its rendered manifest (its
  redis.conf and its start script, paths and address moved to a temporary folder and
  127.0.0.1): the password reaches redis-server on stdin, not on its command line; the
  readiness probe's command answers; the settings the ledger relies on are in force.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outbox_helpers import item, store_index, wait_for  # noqa: E402
from process_helpers import stop_process  # noqa: E402
from test_fleet import REDIS_SERVER, RedisServer, redis  # noqa: E402  (redis: the client, or the module is skipped)

from triton_al.outbox import Outbox  # noqa: E402
from triton_al.serving.server import free_port  # noqa: E402
from triton_al.uploader.ledger import (CA_ENV, CERT_ENV, KEY_ENV, PASSWORD_ENV, USERNAME_ENV, Ledger,  # noqa: E402
                                       LedgerError)
from triton_al.uploader.limits import parse_limits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "9f2c4e8a1b7d3f60a5e9c2d4b8f1a7e3"
ACL_USER, ACL_PASSWORD = "triton-al", "c0ffee42beef"
RULES = parse_limits(["budget=5/day"])["budget"]


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> SimpleNamespace:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make the test certificates")
    d = tmp_path_factory.mktemp("tls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=triton-al test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=triton-al {name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return SimpleNamespace(ca=d / "ca.crt", cert=d / "client.crt", key=d / "client.key",
                           server_cert=d / "server.crt", server_key=d / "server.key")


@pytest.fixture
def secured(tmp_path, certs):
    """Debian's redis-server (test_fleet.RedisServer) with, set at runtime: TLS on a second
    port (client certificates required: Redis' default), an ACL user with the ledger's keys
    only, another with other keys, then a password for the default user."""
    server = RedisServer(tmp_path / "redis")
    try:
        admin = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
        tls_port = free_port()
        try:
            admin.config_set("tls-cert-file", str(certs.server_cert))
            admin.config_set("tls-key-file", str(certs.server_key))
            admin.config_set("tls-ca-cert-file", str(certs.ca))
            admin.config_set("tls-auth-clients", "yes")
            admin.config_set("tls-port", str(tls_port))
        except redis.exceptions.ResponseError as e:
            tls_port = None  # a redis-server built without TLS: the TLS tests skip, saying so
            print(f"redis-server without TLS: {e}")
        admin.acl_setuser(ACL_USER, enabled=True, passwords=[f"+{ACL_PASSWORD}"], keys=["tal:*"],
                          commands=["+@all", "-@dangerous"])
        admin.acl_setuser("elsewhere", enabled=True, passwords=[f"+{ACL_PASSWORD}"], keys=["other:*"],
                          commands=["+@all", "-@dangerous"])
        admin.config_set("requirepass", PASSWORD)
        admin.close()
        yield SimpleNamespace(port=server.port, tls_port=tls_port, url=server.url, certs=certs,
                              tls_url=f"rediss://127.0.0.1:{tls_port}/0")
    finally:
        server.stop()


def tls_env(certs, **extra: str) -> dict[str, str]:
    return {PASSWORD_ENV: PASSWORD, CA_ENV: str(certs.ca), CERT_ENV: str(certs.cert), KEY_ENV: str(certs.key), **extra}


def use(ledger: Ledger) -> list[int]:
    """Ping, reserve, claim and settle: every kind of call the uploader makes."""
    ledger.ping()
    reservation = ledger.reserve("budget", RULES, 3)
    key = ledger.claim_key("budget", "a" * 64)
    assert ledger.claim([key]) == [0]
    ledger.settle([key], [])
    assert reservation.granted == 3
    return ledger.used("budget", RULES)


def failure(uri: str, environ: dict[str, str], **kwargs) -> str:
    ledger = Ledger.open(uri, "auth", "me", environ=environ, **kwargs)
    try:
        with pytest.raises(LedgerError) as e:
            use(ledger)
    finally:
        ledger.close()
    text = str(e.value)
    assert "Traceback" not in text and PASSWORD not in text and ACL_PASSWORD not in text
    return text


def test_the_password_comes_from_the_environment(secured):
    ledger = Ledger.open(secured.url, "auth", "me", environ={PASSWORD_ENV: PASSWORD})
    try:
        assert use(ledger) == [3]
    finally:
        ledger.close()


@pytest.mark.parametrize("environ, says", [
    ({}, f"the ledger requires a password and none is set: set {PASSWORD_ENV}"),
    ({PASSWORD_ENV: "not-the-password"}, f"the ledger refused the password of the default user: check {PASSWORD_ENV}"),
    ({PASSWORD_ENV: ACL_PASSWORD, USERNAME_ENV: "nobody"}, f"refused the password of user 'nobody': check {PASSWORD_ENV} and {USERNAME_ENV}"),
])
def test_a_missing_or_refused_password_is_named(secured, environ, says):
    assert says in failure(secured.url, environ)


def test_an_acl_user_with_the_ledgers_keys_works_and_one_without_them_is_told_why(secured):
    ledger = Ledger.open(secured.url, "auth", "me", environ={PASSWORD_ENV: ACL_PASSWORD, USERNAME_ENV: ACL_USER})
    try:
        assert use(ledger) == [3]
    finally:
        ledger.close()
    text = failure(secured.url, {PASSWORD_ENV: ACL_PASSWORD, USERNAME_ENV: "elsewhere"})
    assert "NoPermissionError" in text and "lacks a permission the ledger needs (its keys tal:*" in text
    with pytest.raises(ValueError, match=f"{USERNAME_ENV} is set but {PASSWORD_ENV} is not"):
        Ledger.open(secured.url, "auth", "me", environ={USERNAME_ENV: ACL_USER})


def test_tls_with_a_private_ca_and_a_client_certificate(secured):
    if secured.tls_port is None:
        pytest.skip("Debian's redis-server was built without TLS: passwords tested only")
    for host in ("127.0.0.1", "localhost"):  # both are in the server's certificate
        ledger = Ledger.open(f"rediss://{host}:{secured.tls_port}/0", f"auth-{host}", "me", environ=tls_env(secured.certs))
        try:
            assert use(ledger) == [3]
        finally:
            ledger.close()
    certs = secured.certs
    assert f"the server's TLS certificate is not trusted: put the CA that signed it in a PEM file and point {CA_ENV}" in \
        failure(secured.tls_url, {k: v for k, v in tls_env(certs).items() if k != CA_ENV})
    # TLS 1.3: the refusal is an alert, or the connection closed, depending on timing.
    no_cert = failure(secured.tls_url, {PASSWORD_ENV: PASSWORD, CA_ENV: str(certs.ca)})
    assert "client certificate" in no_cert and f"set {CERT_ENV} (and {KEY_ENV})" in no_cert, no_cert
    assert f"refused the password of the default user: check {PASSWORD_ENV}" in \
        failure(secured.tls_url, tls_env(certs, **{PASSWORD_ENV: "nope"}))
    assert "is this port a TLS port" in failure(f"rediss://127.0.0.1:{secured.port}/0", tls_env(certs), timeout_s=0.5)
    assert "if the port is a TLS port, use rediss://" in failure(f"redis://127.0.0.1:{secured.tls_port}/0", {PASSWORD_ENV: PASSWORD})
    # Settings that cannot work are refused before connecting.
    with pytest.raises(ValueError, match=f"{CA_ENV} set, but the URI is redis:// \\(no TLS\\): use rediss://"):
        Ledger.open(secured.url, "auth", "me", environ={PASSWORD_ENV: PASSWORD, CA_ENV: str(certs.ca)})
    with pytest.raises(ValueError, match=f"{CA_ENV}=/nowhere/ca.pem: no such file"):
        Ledger.open(secured.tls_url, "auth", "me", environ={CA_ENV: "/nowhere/ca.pem"})
    with pytest.raises(ValueError, match=f"{KEY_ENV} is set without {CERT_ENV}"):
        Ledger.open(secured.tls_url, "auth", "me", environ={KEY_ENV: str(certs.key)})


def run_uploader(tmp: Path, ledger_url: str, environ: dict[str, str], deadline: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_AL_LEDGER_")}
    env.update(environ)
    return subprocess.run([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(tmp / "outbox.db"),
                           "--store", str(tmp / "store"), "--budget-ledger", ledger_url, "--rate-limit", "budget=100/day",
                           "--once", "--deadline", str(deadline), "--log-format", "text"],
                          capture_output=True, text=True, timeout=120, env=env)


def test_the_uploader_holds_its_items_on_a_refused_password_and_delivers_them_with_the_right_one(secured, tmp_path):
    tls = secured.tls_port is not None
    url = secured.tls_url if tls else secured.url
    good = tls_env(secured.certs) if tls else {PASSWORD_ENV: PASSWORD}
    with Outbox(tmp_path / "outbox.db") as box:
        box.append_many([item(i, groups=("budget", "free")) for i in range(6)])
    wrong = run_uploader(tmp_path, url, {**good, PASSWORD_ENV: "not-the-password"}, deadline=2)
    print(wrong.stderr[-3000:])
    assert wrong.returncode == 1, wrong.stderr
    assert "Traceback" not in wrong.stderr and "not-the-password" not in wrong.stderr
    assert f"the ledger refused the password of the default user: check {PASSWORD_ENV}" in wrong.stderr
    assert "none dropped" in wrong.stderr
    with Outbox(tmp_path / "outbox.db") as box:
        assert sum(s.queued for s in box.status()) == 12, "every item is still queued"
        assert box.counters().get("dropped_rate_limit", 0) == 0
    assert store_index(tmp_path / "store", "budget") == [] and store_index(tmp_path / "store", "free") == []
    right = run_uploader(tmp_path, url, good, deadline=30)
    assert right.returncode == 0, right.stderr
    assert PASSWORD not in right.stderr
    assert len(store_index(tmp_path / "store", "budget")) == 6 and len(store_index(tmp_path / "store", "free")) == 6
    with Outbox(tmp_path / "outbox.db") as box:
        assert sum(s.queued for s in box.status()) == 0
    ledger = Ledger.open(url, "unused", "me", environ=good)
    try:
        counters = ledger.client.keys("tal:*:b:budget:*")
        assert len(counters) == 1 and int(ledger.client.get(counters[0])) == 6, "the budget was counted in the ledger"
    finally:
        ledger.close()


# The component's Redis, from its rendered manifest ----------------------------------------


def component_redis() -> tuple[str, str, list[str]]:
    """(redis.conf, the start script, the readiness probe's command) of the rendered fleet overlay."""
    import deploy_kustomize

    objects = deploy_kustomize.render(ROOT / "deploy" / "kubernetes" / "overlays" / "fleet")
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton-al-ledger")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    conf = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "triton-al-ledger")["data"]["redis.conf"]
    assert container["command"] == ["/bin/sh", "-c"]
    return conf, container["args"][-1], container["readinessProbe"]["exec"]["command"]


def _moved(text: str, old: str, new: str) -> str:
    assert re.search(old, text, flags=re.M), f"{old!r} is no longer in the component's Redis settings"
    return re.sub(old, new, text, flags=re.M)


class ComponentRedis:
    """The component's start script run by /bin/sh with Debian's redis-server, its redis.conf
    moved to a temporary folder and 127.0.0.1:PORT; stopped by PID."""

    def __init__(self, root: Path, password: str) -> None:
        conf, script, probe = component_redis()
        self.port = free_port()
        (root / "data").mkdir(parents=True, exist_ok=True)
        conf = _moved(conf, r"^bind .*$", "bind 127.0.0.1")
        conf = _moved(conf, r"^port 6379$", f"port {self.port}")
        conf = _moved(conf, r"^dir /data$", f"dir {root / 'data'}")
        conf += f"logfile {root / 'redis.log'}\n"
        (root / "redis.conf").write_text(conf)
        self.script = _moved(script, r"redis-server /etc/redis/redis\.conf", f"{REDIS_SERVER} {root / 'redis.conf'}")
        self.probe = [_moved(a, r"-p 6379", f"-p {self.port}") if "redis-cli" in a else a for a in probe]
        self.env = {"PATH": f"{Path(REDIS_SERVER).parent}:/usr/bin:/bin", "REDISCLI_AUTH": password}
        self.root = root
        self.proc = subprocess.Popen(["/bin/sh", "-c", self.script], env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def ready(self) -> bool:
        return subprocess.run(self.probe, env=self.env, capture_output=True, timeout=10).returncode == 0

    def stop(self) -> None:
        stop_process(self.proc)
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


def test_the_components_redis_starts_from_its_manifest_and_keeps_the_password_off_its_command_line(tmp_path):
    if shutil.which("redis-cli") is None:
        pytest.skip("no redis-cli (Debian's redis-tools) for the readiness probe")
    server = ComponentRedis(tmp_path, PASSWORD)
    try:
        wait_for(lambda: server.ready() or server.proc.poll() is not None, 20, "the readiness probe")
        assert server.proc.poll() is None, server.proc.stderr.read()
        # The shell exec'd redis-server: the container's main process, given the password on stdin only.
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode()
        assert "redis-server" in cmdline and PASSWORD not in cmdline, cmdline
        ledger = Ledger.open(f"redis://127.0.0.1:{server.port}/0", "component", "me", environ={PASSWORD_ENV: PASSWORD})
        try:
            assert use(ledger) == [3]
            settings = ledger.client.config_get("*")
            assert settings["appendonly"] == "yes" and settings["appendfsync"] == "always"
            assert settings["maxmemory-policy"] == "noeviction" and int(settings["maxmemory"]) == 1536 * 1024 ** 2
            assert settings["save"] == ""
            # What a claim and its delivered-marker cost (the ConfigMap's sizing note).
            before = ledger.client.info("memory")["used_memory"]
            n = 20_000
            for start in range(0, n, 1000):
                keys = [ledger.claim_key("budget", f"{i:064x}") for i in range(start, start + 1000)]
                assert ledger.claim(keys) == [0] * 1000
                ledger.settle(keys, [])
            per_item = (ledger.client.info("memory")["used_memory"] - before) / n
            print(f"ledger memory per delivered item: {per_item:.0f} bytes")
            assert per_item < 250, "the sizing note in components/ledger/redis.yaml (about 240 bytes) is wrong"
        finally:
            ledger.close()
        assert "the ledger requires a password and none is set" in failure(f"redis://127.0.0.1:{server.port}/0", {})
        assert server.proc.poll() is None
        bad_probe = subprocess.run(server.probe, env={**server.env, "REDISCLI_AUTH": "wrong"}, capture_output=True, timeout=10)
        assert bad_probe.returncode != 0, "the readiness probe must fail without the password"
    finally:
        server.stop()
    assert list((tmp_path / "data").glob("appendonlydir/*.aof")), "no append-only file was written"


@pytest.mark.parametrize("password, says", [
    ("", "no password: set TRITON_AL_LEDGER_PASSWORD in the Secret triton-al-secrets"),
    ("two words", "the password may hold only letters, digits and ._~+/=-"),
    ('quo"te', "the password may hold only letters, digits and ._~+/=-"),
])
def test_the_components_redis_refuses_a_password_it_could_not_pass_on(tmp_path, password, says):
    server = ComponentRedis(tmp_path, password)
    try:
        rc = server.proc.wait(10)
        err = server.proc.stderr.read()
    finally:
        server.stop()
    assert rc == 1 and says in err, (rc, err)
    assert not (tmp_path / "data" / "appendonlydir").exists()


def test_the_gate_counts_refused_passwords_and_certificates_as_their_own_kinds(secured):
    """triton_al_uploader_ledger_errors_total{kind}: auth and tls apart from connection
    failures, so that an alert or a dashboard tells a wrong Secret from a Redis that is down."""
    from prometheus_client import CollectorRegistry

    from triton_al.uploader.ledger import FleetGate

    cases = [(secured.url, {PASSWORD_ENV: "not-the-password"}, "auth"),
             (secured.url, {PASSWORD_ENV: ACL_PASSWORD, USERNAME_ENV: "elsewhere"}, "auth")]
    if secured.tls_port is not None:
        cases.append((secured.tls_url, {k: v for k, v in tls_env(secured.certs).items() if k != CA_ENV}, "tls"))
    for uri, environ, kind in cases:
        registry = CollectorRegistry()
        gate = FleetGate(Ledger.open(uri, "auth", "me", environ=environ), {"budget": RULES}, registry=registry)
        try:
            queued = SimpleNamespace(id=1, upload_group="budget", content_hash="ab" * 32)  # as the outbox hands it over
            admission = gate.admit([queued], time.time())
            assert admission.upload == [] and len(admission.held) == 1, "the item is held, not uploaded or dropped"
            assert registry.get_sample_value("triton_al_uploader_ledger_up") == 0
            assert registry.get_sample_value("triton_al_uploader_ledger_errors_total", {"kind": kind}) == 1, (uri, environ)
            assert "none dropped" in gate.error
        finally:
            gate.ledger.close()
    # A ledger that is down is a connection error, as before.
    registry = CollectorRegistry()
    gate = FleetGate(Ledger.open(f"redis://127.0.0.1:{free_port()}/0", "auth", "me", environ={}), {}, registry=registry)
    try:
        gate.admit([SimpleNamespace(id=2, upload_group="any", content_hash="cd" * 32)], time.time())
        assert registry.get_sample_value("triton_al_uploader_ledger_errors_total", {"kind": "connection"}) == 1
    finally:
        gate.ledger.close()
