"""The fleet ledger: per-group budgets that hold across a fleet of uploaders, and per-item
claims so that replicas racing on the same image upload it once.

Without a ledger every uploader counts its own deliveries (`limits.py`): ten replicas with
a 500/day budget send 5,000 a day. With `--budget-ledger redis://host:port/db` every
replica reserves from one Redis before it uploads:

- **Budgets**: a counter per (sink, group, rule, window), the window aligned to the epoch
  (`N/day` is a UTC day, `N/hour` a clock hour, ...) on the ledger's own clock (Redis
  `TIME`: replicas whose clocks differ still share one window). A Lua script grants
  `min(wanted, cap - used)` over every rule of the group and adds the grant, in one atomic
  step; the counter expires after its window. What a batch does not deliver (a failure, the
  sink down, an item left for the next batch) is given back. The ledger never grants more
  than the cap, so the fleet never delivers more than the budget per window; items reserved
  just before a window ends may land just after it.
- **Claims**: before uploading, a replica claims each item's (group, hash) (`SET` if absent,
  `claim_ttl_s`); an item another replica holds stays queued and is asked about again; once
  delivered, the claim becomes a `done` marker (`done_ttl_s`) and a replica holding the same
  image marks it delivered without uploading it again (and without spending budget). The
  first batch of each group in a process is also taken under a group claim, so that two
  replicas do not both create the group's project in a sink that makes one per group.
- **The ledger unreachable** (or answering wrongly): nothing that needs it is uploaded,
  nothing is dropped. With claims (the default) every group is held; with `claims=False`
  only the rate-limited ones. The items stay queued; the uploader reports it (the
  `triton_al_uploader_ledger_up` gauge at 0, a log line on every change and once a minute,
  the admin status's `last_error`) and asks again with backoff; they flow once it answers.

What it does not protect against: a Redis that loses its data (restarted without
persistence, a failover to a replica that lagged) forgets the window's counts, and the
fleet may then deliver up to the budget again in that window: run it with `appendonly yes`.
A replica that dies holding claims makes the others wait up to `claim_ttl_s` for those
items (a replica restarted on the same outbox takes its own claims back at once: the owner
is named by host and outbox path). Replicas must agree on the limits: each applies its own
caps to the shared counters.

Credentials never go in the URI (it is logged) nor on the command line; they come from the
environment: `TRITON_AL_LEDGER_PASSWORD` (Redis `requirepass`, or an ACL user's password with
`TRITON_AL_LEDGER_USERNAME`). With `rediss://` the server's certificate is checked against the
system's CAs, or the PEM bundle in `TRITON_AL_LEDGER_CA`; `TRITON_AL_LEDGER_CERT` (and
`TRITON_AL_LEDGER_KEY`, when the key is a file of its own) is the client certificate for a
server that asks for one (Redis' `tls-auth-clients yes`, its default). A refused password or
certificate is reported as such (naming the variable to check), and the items wait.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from triton_al.config import validate_group_name
from triton_al.uploader.limits import RateLimit, limits_for

log = logging.getLogger("triton_al.uploader")
PASSWORD_ENV = "TRITON_AL_LEDGER_PASSWORD"
USERNAME_ENV = "TRITON_AL_LEDGER_USERNAME"
CA_ENV = "TRITON_AL_LEDGER_CA"
CERT_ENV = "TRITON_AL_LEDGER_CERT"
KEY_ENV = "TRITON_AL_LEDGER_KEY"
TLS_ENVS = (CA_ENV, CERT_ENV, KEY_ENV)
USAGE = "expected redis://HOST[:PORT][/DB] or rediss://HOST[:PORT][/DB] (password from $TRITON_AL_LEDGER_PASSWORD)"
WINDOW_SLACK_S = 300
"""A budget counter lives this long past its window (a late release still finds it)."""

# KEYS: one counter name per rule, without its window. ARGV: wanted, now ('' for the
# ledger's own clock: one clock for the whole fleet), then (cap, window_s, ttl_ms) per rule.
# Grants min(wanted, cap - used) over every rule and adds it to each window's counter,
# atomically; returns the grant and the counters' full names.
_RESERVE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local keys = {}
local grant = tonumber(ARGV[1])
for i, base in ipairs(KEYS) do
  keys[i] = base .. ':' .. string.format('%d', math.floor(now / tonumber(ARGV[3 * i + 1])))
  local left = tonumber(ARGV[3 * i]) - tonumber(redis.call('GET', keys[i]) or '0')
  if left < grant then grant = left end
end
if grant < 0 then grant = 0 end
if grant > 0 then
  for i, key in ipairs(keys) do
    redis.call('INCRBY', key, grant)
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ARGV[3 * i + 2]) end
  end
end
table.insert(keys, 1, grant)
return keys
"""
# KEYS: the counters of a reservation. ARGV: how many to give back (never below zero; an
# expired counter is left alone).
_RELEASE = """
for _, key in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', key) or '-1')
  if used > 0 then redis.call('DECRBY', key, math.min(used, tonumber(ARGV[1]))) end
end
return 1
"""
# KEYS: claim keys. ARGV: owner, ttl_ms. Per key: 0 = ours now, 1 = another's, 2 = delivered.
_CLAIM = """
local out = {}
local mine = 'c:' .. ARGV[1]
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v or v == mine then
    redis.call('SET', key, mine, 'PX', ARGV[2])
    out[i] = 0
  elseif v == 'done' then
    out[i] = 2
  else
    out[i] = 1
  end
end
return out
"""
# KEYS: claim keys. ARGV: owner, done_ttl_ms, then '1' (delivered: mark done) or '0' (give
# the claim back, if still ours) per key.
_SETTLE = """
local mine = 'c:' .. ARGV[1]
for i, key in ipairs(KEYS) do
  if ARGV[i + 2] == '1' then
    redis.call('SET', key, 'done', 'PX', ARGV[2])
  elseif redis.call('GET', key) == mine then
    redis.call('DEL', key)
  end
end
return 1
"""


class LedgerError(Exception):
    """The ledger could not be reached or gave an answer that cannot be used. `kind` (for the
    triton_al_uploader_ledger_errors_total metric): connection, timeout, auth (a missing or
    refused password, an ACL user without a permission), tls (an untrusted certificate, a
    client certificate asked for) or error."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class LedgerAddress:
    host: str
    port: int
    db: int
    tls: bool

    def __str__(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def parse_ledger_uri(uri: str) -> LedgerAddress:
    """`redis://host[:port][/db]` (or `rediss://` for TLS); a clear error for anything else."""
    text = str(uri).strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"--budget-ledger {uri!r}: {e}; {USAGE}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"--budget-ledger {uri!r}: unknown scheme {parts.scheme or '(none)'!r}; {USAGE}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"--budget-ledger: credentials do not go in the URI (it is logged); set {PASSWORD_ENV}")
    if not parts.hostname:
        raise ValueError(f"--budget-ledger {uri!r}: no host; {USAGE}")
    if parts.query or parts.fragment:
        raise ValueError(f"--budget-ledger {uri!r}: no query or fragment is understood; {USAGE}")
    path = unquote(parts.path).strip("/")
    if path and not path.isdigit():
        raise ValueError(f"--budget-ledger {uri!r}: the path must be a database number, got {path!r}; {USAGE}")
    return LedgerAddress(parts.hostname, port or 6379, int(path or 0), parts.scheme == "rediss")


def connection_settings(address: LedgerAddress, environ: Any = None) -> dict[str, Any]:
    """The Redis client's credentials and TLS settings, from the environment (never the URI);
    a clear error for a setting that cannot work (a missing file, TLS files without rediss://)."""
    env = os.environ if environ is None else environ
    settings: dict[str, Any] = {"password": env.get(PASSWORD_ENV) or None}
    username = env.get(USERNAME_ENV) or None
    if username is not None:
        if settings["password"] is None:
            raise ValueError(f"--budget-ledger: {USERNAME_ENV} is set but {PASSWORD_ENV} is not (an ACL user logs in with a password)")
        settings["username"] = username
    files = {name: env.get(name) or None for name in TLS_ENVS}
    if not address.tls:
        given = [name for name, value in files.items() if value]
        if given:
            raise ValueError(f"--budget-ledger {address}: {', '.join(given)} set, but the URI is redis:// (no TLS): use rediss://")
        return settings
    for name, value in files.items():
        if value and not os.path.isfile(value):
            raise ValueError(f"--budget-ledger: {name}={value}: no such file")
    if files[KEY_ENV] and not files[CERT_ENV]:
        raise ValueError(f"--budget-ledger: {KEY_ENV} is set without {CERT_ENV} (the client certificate)")
    settings.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True)
    if files[CA_ENV]:
        settings["ssl_ca_certs"] = files[CA_ENV]
    if files[CERT_ENV]:
        settings["ssl_certfile"] = files[CERT_ENV]
        settings["ssl_keyfile"] = files[KEY_ENV]
    return settings


def owner_id(outbox: str | os.PathLike[str]) -> str:
    """Who holds a claim: this host and this outbox (one uploader per outbox), so that a
    replica restarted on its outbox takes its own claims back."""
    return hashlib.sha256(f"{socket.gethostname()}\0{os.path.realpath(outbox)}".encode()).hexdigest()[:16]


@dataclass
class Reservation:
    group: str
    keys: list[str]
    granted: int


class Ledger:
    """Budget counters and item claims in Redis, under one namespace (one per sink)."""

    def __init__(self, client: Any, namespace: str, owner: str, *, where: str = "redis",
                 claim_ttl_s: float = 300.0, done_ttl_s: float = 3600.0) -> None:
        if claim_ttl_s <= 0 or done_ttl_s <= 0:
            raise ValueError(f"claim and done TTLs must be positive, got {claim_ttl_s} and {done_ttl_s}")
        self.client, self.owner, self.where = client, owner, where
        # One hash tag: every key of a namespace lives in one slot (multi-key scripts work on a cluster).
        self.prefix = f"tal:{{{hashlib.sha256(namespace.encode()).hexdigest()[:16]}}}"
        self.claim_ttl_ms, self.done_ttl_ms = int(claim_ttl_s * 1000), int(done_ttl_s * 1000)
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)

    @classmethod
    def open(cls, uri: str, namespace: str, owner: str, *, timeout_s: float = 2.0,
             environ: dict[str, str] | None = None, **kwargs: Any) -> Ledger:
        address = parse_ledger_uri(uri)
        env = os.environ if environ is None else environ
        connection = connection_settings(address, env)
        try:
            import redis
        except ImportError:
            raise ValueError("--budget-ledger needs the Redis client: pip install 'triton-al[fleet]' (or redis>=5)") from None
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One quick retry (a connection the server closed); the uploader does the real retrying.
        client = redis.Redis(host=address.host, port=address.port, db=address.db, socket_timeout=timeout_s,
                             socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1), health_check_interval=30,
                             **connection)
        ledger = cls(client, namespace, owner, where=str(address), **kwargs)
        ledger._auth = (connection.get("username"), connection.get("password") is not None)
        ledger._tls = address.tls
        ledger._client_cert = "ssl_certfile" in connection
        return ledger

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        import redis

        try:
            return fn()
        except redis.exceptions.RedisError as e:
            hint = self._hint(e)
            raise LedgerError(f"budget ledger {self.where}: {what} failed ({type(e).__name__}: {e}){hint}",
                              kind=self._kind(e, hint)) from None

    @staticmethod
    def _kind(error: Exception, hint: str) -> str:
        import redis

        if "password" in hint or "permission" in hint:
            return "auth"
        if "certificate" in hint:
            return "tls"
        if isinstance(error, redis.exceptions.TimeoutError):
            return "timeout"
        if isinstance(error, redis.exceptions.ConnectionError):
            return "connection"
        return "error"

    _auth: tuple[str | None, bool] = (None, False)
    _tls = False
    _client_cert = False

    def _hint(self, error: Exception) -> str:
        """What to check, for the errors whose message does not say it (an empty string otherwise)."""
        import redis

        text = str(error)
        username, has_password = self._auth
        if isinstance(error, redis.exceptions.AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text \
                or "without any password configured" in text:
            if not has_password:
                return (f"; the ledger requires a password and none is set: set {PASSWORD_ENV}"
                        + (f" (and {USERNAME_ENV} for an ACL user)" if username is None else ""))
            if "without any password configured" in text:
                return f"; {PASSWORD_ENV} is set but the ledger has no password: unset it, or set requirepass on the server"
            who = f"user {username!r}" if username else "the default user"
            return f"; the ledger refused the password of {who}: check {PASSWORD_ENV}" + (f" and {USERNAME_ENV}" if username else "")
        if isinstance(error, redis.exceptions.NoPermissionError) or "NOPERM" in text:
            return "; the ledger's ACL user lacks a permission the ledger needs (its keys tal:*, EVAL/EVALSHA, TIME, PING, MGET; XADD, XREAD, PEXPIRE to share near-duplicates)"
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return (f"; the server's TLS certificate is not trusted: put the CA that signed it in a PEM file and point "
                    f"{CA_ENV} at it (the host name in the URI must be in the certificate)")
        lower = text.lower()
        if "certificate required" in lower or ("alert" in lower and "certificate" in lower):
            return f"; the server asks for a client certificate: set {CERT_ENV} (and {KEY_ENV})"
        if self._tls and not self._client_cert and ("eof occurred in violation of protocol" in lower or "unexpected_eof" in lower):
            # TLS 1.3: a server refusing a client without a certificate may just close the connection.
            return (f"; the server closed the TLS connection: if it asks for a client certificate (Redis' "
                    f"tls-auth-clients yes, its default), set {CERT_ENV} (and {KEY_ENV})")
        if self._tls and isinstance(error, redis.exceptions.TimeoutError):
            return "; is this port a TLS port (rediss:// speaks TLS; a plain Redis port does not answer it)?"
        if not self._tls and "reset by peer" in text:
            return "; if the port is a TLS port, use rediss://"
        return ""

    def ping(self) -> None:
        if self._call("ping", self.client.ping) is not True:
            raise LedgerError(f"budget ledger {self.where}: ping got no PONG")

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass

    # Budgets ------------------------------------------------------------------------

    def _budget_base(self, group: str, rule: RateLimit) -> str:
        return f"{self.prefix}:b:{validate_group_name(group)}:{max(1, int(rule.window_s))}"

    def budget_key(self, group: str, rule: RateLimit, now: float) -> str:
        window = max(1, int(rule.window_s))
        return f"{self._budget_base(group, rule)}:{int(now // window)}"

    def reserve(self, group: str, rules: Sequence[RateLimit], wanted: int, now: float | None = None) -> Reservation:
        """Take up to `wanted` deliveries of `group`'s budget in the current windows: by the
        ledger's clock (Redis `TIME`), so that replicas whose clocks differ share one window;
        `now` overrides it (tests)."""
        bases = [self._budget_base(group, r) for r in rules]
        if wanted <= 0 or not bases:
            return Reservation(group, [], 0)
        args: list[Any] = [wanted, "" if now is None else repr(float(now))]
        for r in rules:
            window = max(1, int(r.window_s))
            args += [r.count, window, int((window + WINDOW_SLACK_S) * 1000)]
        answer = self._call("reserve", lambda: self._reserve(keys=bases, args=args))
        if not isinstance(answer, list) or len(answer) != len(bases) + 1 or not isinstance(answer[0], int) \
                or not 0 <= answer[0] <= wanted:
            raise LedgerError(f"budget ledger {self.where}: reserve answered {answer!r}")
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in answer[1:]]
        return Reservation(group, keys, answer[0])

    def release(self, reservation: Reservation, count: int) -> None:
        """Give back `count` deliveries of a reservation that were not used."""
        count = min(count, reservation.granted)
        if count > 0:
            self._call("release", lambda: self._release(keys=reservation.keys, args=[count]))
            reservation.granted -= count

    def used(self, group: str, rules: Sequence[RateLimit], now: float | None = None) -> list[int]:
        """Deliveries counted against each rule in its current window (by the ledger's clock)."""
        if now is None:
            seconds, micros = self._call("read the clock", self.client.time)
            now = seconds + micros / 1e6
        keys = [self.budget_key(group, r, now) for r in rules]
        values = self._call("read", lambda: self.client.mget(keys)) if keys else []
        return [int(v or 0) for v in values]

    # Claims -------------------------------------------------------------------------

    def claim_key(self, group: str, content_hash: str) -> str:
        return f"{self.prefix}:c:{validate_group_name(group)}:{content_hash}"

    def claim(self, keys: Sequence[str]) -> list[int]:
        """0: ours now, 1: another replica's, 2: already delivered (by anyone)."""
        if not keys:
            return []
        states = self._call("claim", lambda: self._claim(keys=list(keys), args=[self.owner, self.claim_ttl_ms]))
        if not isinstance(states, list) or len(states) != len(keys) or any(s not in (0, 1, 2) for s in states):
            raise LedgerError(f"budget ledger {self.where}: claim answered {states!r}")
        return states

    def settle(self, done: Sequence[str], released: Sequence[str]) -> None:
        keys = [*done, *released]
        if keys:
            flags = ["1"] * len(done) + ["0"] * len(released)
            self._call("settle", lambda: self._settle(keys=keys, args=[self.owner, self.done_ttl_ms, *flags]))


@dataclass
class Admission:
    """What the ledger said about a batch."""

    upload: list = field(default_factory=list)
    """Items to upload now (claimed, and within budget)."""
    elsewhere: list = field(default_factory=list)
    """Items another replica delivered already: delivered here too, without an upload."""
    held: list = field(default_factory=list)
    """Items left queued this time (another replica's claim, the budget spent in keep mode, the ledger down)."""
    over: list = field(default_factory=list)
    """Items over the fleet budget in drop mode."""
    reservations: list[Reservation] = field(default_factory=list)
    claims: dict[int, str] = field(default_factory=dict)
    """Item id -> claim key, for the items this replica claimed."""
    group_claims: list[str] = field(default_factory=list)


class FleetGate:
    """The uploader's side of the ledger: admits a batch before upload, settles it after.
    Never raises for the ledger's sake: when the ledger fails, the items are held."""

    def __init__(self, ledger: Ledger, limits: dict[str, list[RateLimit]], *, rate_overflow: str = "keep",
                 claims: bool = True, registry: Any | None = None, monotonic: Callable[[], float] = time.monotonic,
                 backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0, seed: int | None = None) -> None:
        self.ledger, self.limits, self.rate_overflow, self.claims = ledger, limits, rate_overflow, claims
        self.monotonic = monotonic
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self._rng = random.Random(seed)
        self.up = True
        self.error = ""
        self.failures = 0
        self._retry_at = 0.0
        self._logged_at = -1e9
        self._down_since: float | None = None
        self._answered_at = monotonic()
        self.health_interval_s = 10.0
        """While up, an idle replica pings this often, so that its gauge says an outage too."""
        self._exhausted: dict[str, float] = {}  # group -> monotonic time to ask the ledger again
        self._introduced: set[str] = set()  # groups whose first batch went through in this process
        self._lock = threading.Lock()
        self.metrics = _GateMetrics(registry) if registry is not None else None

    def describe(self) -> str:
        return f"budget ledger {self.ledger.where}" + (" with claims" if self.claims else "")

    def _needs_ledger(self, group: str) -> bool:
        return self.claims or bool(limits_for(self.limits, group))

    def _failed(self, error: LedgerError) -> None:
        self.failures += 1
        delay = max(0.05, self._rng.uniform(0.5, 1.0) * min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(self.failures, 20)))
        now = self.monotonic()
        self._retry_at = now + delay
        self.error = f"{error}; items of the groups that need it stay queued (none dropped); asking again in {delay:.1f} s"
        if self.up or now - self._logged_at >= 60:
            log.error("%s", self.error)
            self._logged_at = now
        if self.up:
            self._down_since = now
        self.up = False
        if self.metrics is not None:
            self.metrics.down(error)

    def _recovered(self) -> None:
        if not self.up:
            down_for = self.monotonic() - (self._down_since or self.monotonic())
            log.warning("budget ledger %s answers again after %.1f s; held items flow again", self.ledger.where, down_for)
        self.up, self.error, self.failures = True, "", 0
        self._answered_at = self.monotonic()
        if self.metrics is not None:
            self.metrics.set_up()

    def check(self) -> None:
        """Ask the ledger now, backoff permitting (another user of it, the near-duplicate
        sharing, found it not answering): if it is down, the gate holds the groups that need it
        from the next batch on, and says why."""
        with self._lock:
            if self.up or self.monotonic() >= self._retry_at:
                self._ping()

    def _ping(self) -> bool:
        """Ask the ledger, and record what it said: up (answered now), or down (with backoff)."""
        try:
            self.ledger.ping()
        except LedgerError as e:
            self._failed(e)
            return False
        self._recovered()
        return True

    def held_groups(self, queued_groups: Callable[[], Iterable[str]]) -> list[str]:
        """Groups not to take from the outbox now: every group needing the ledger while it is
        down (asked again once its backoff passed), and groups whose fleet budget is spent
        (asked again within a second or two)."""
        now = self.monotonic()
        with self._lock:
            self._exhausted = {g: t for g, t in self._exhausted.items() if t > now}
            held = set(self._exhausted)
            if self.up and now - self._answered_at >= self.health_interval_s:
                self._ping()
            if not self.up and (now < self._retry_at or not self._ping()):
                held.update(g for g in queued_groups() if self._needs_ledger(g))
            return sorted(held)

    def spent_groups(self) -> list[str]:
        """Groups whose fleet budget was found spent within the last second or two."""
        now = self.monotonic()
        with self._lock:
            return sorted(g for g, t in self._exhausted.items() if t > now)

    def admit(self, batch: Sequence[Any], now: float) -> Admission:
        """Claim the batch's items, reserve the budget of the claimed ones; on a ledger
        failure give back what was taken and hold every item that needs the ledger."""
        with self._lock:
            adm = Admission()
            free = [i for i in batch if not self._needs_ledger(i.upload_group)]
            ruled = [i for i in batch if self._needs_ledger(i.upload_group)]
            if not self.up and self.monotonic() < self._retry_at:
                adm.upload, adm.held = free, ruled
                return adm
            try:
                claimed = self._claim(ruled, adm)
                self._reserve(claimed, adm, now)
            except LedgerError as e:
                self._undo(adm)
                self._failed(e)
                return Admission(upload=free, held=ruled)
            self._recovered()
            adm.upload = free + adm.upload
            adm.upload.sort(key=lambda i: i.id)
            if self.metrics is not None:
                self.metrics.admitted(adm)
            return adm

    def _claim(self, items: list[Any], adm: Admission) -> list[Any]:
        if not self.claims or not items:
            return items
        # A group's first batch in this process goes under a group claim: the sink may
        # create the group's project on it, and two replicas must not both do that.
        new_groups = sorted({i.upload_group for i in items} - self._introduced)
        if new_groups:
            keys = [self.ledger.claim_key(g, "group") for g in new_groups]
            states = self.ledger.claim(keys)
            busy = {g for g, s in zip(new_groups, states) if s == 1}
            adm.group_claims = [k for k, s in zip(keys, states) if s == 0]
            self._introduced.update(g for g, s in zip(new_groups, states) if s == 2)
            if busy:
                adm.held += [i for i in items if i.upload_group in busy]
                items = [i for i in items if i.upload_group not in busy]
        keys = [self.ledger.claim_key(i.upload_group, i.content_hash) for i in items]
        states = self.ledger.claim(keys)
        claimed = []
        for item, key, state in zip(items, keys, states):
            if state == 0:
                adm.claims[item.id] = key
                claimed.append(item)
            elif state == 2:
                adm.elsewhere.append(item)
            else:
                adm.held.append(item)
        return claimed

    def _reserve(self, items: list[Any], adm: Admission, now: float) -> None:
        by_group: dict[str, list[Any]] = {}
        for item in items:
            by_group.setdefault(item.upload_group, []).append(item)
        for group, members in by_group.items():
            rules = limits_for(self.limits, group)
            if not rules:
                adm.upload += members
                continue
            reservation = self.ledger.reserve(group, rules, len(members))  # the ledger's clock
            adm.reservations.append(reservation)
            adm.upload += members[:reservation.granted]
            rest = members[reservation.granted:]
            if rest:
                if self.rate_overflow == "drop":
                    adm.over += rest
                else:
                    adm.held += rest
                    # Spent for now: ask again in a second or two (a release elsewhere may free some).
                    self._exhausted[group] = self.monotonic() + 1.0 + self._rng.random()
                unclaim = [adm.claims.pop(i.id) for i in rest if i.id in adm.claims]
                self.ledger.settle([], unclaim)

    def _undo(self, adm: Admission) -> None:
        """Give back what an admission took before the ledger failed (best effort: claims
        expire and an unreleased reservation only leaves budget unused)."""
        try:
            for r in adm.reservations:
                self.ledger.release(r, r.granted)
            self.ledger.settle([], [*adm.claims.values(), *adm.group_claims])
        except LedgerError:
            pass

    def settle(self, adm: Admission, delivered_ids: Iterable[int]) -> None:
        """After the outbox recorded the batch: delivered claims become `done`, the rest are
        given back, and so is the budget of every item not delivered."""
        delivered = set(delivered_ids)
        with self._lock:
            try:
                for r in adm.reservations:
                    used = sum(1 for i in adm.upload if i.upload_group == r.group and i.id in delivered)
                    self.ledger.release(r, r.granted - used)
                done = [k for i, k in adm.claims.items() if i in delivered]
                done += [self.ledger.claim_key(i.upload_group, i.content_hash) for i in adm.elsewhere]
                released = [k for i, k in adm.claims.items() if i not in delivered]
                if adm.group_claims:
                    went = {i.upload_group for i in adm.upload if i.id in delivered}
                    self._introduced.update(went)
                    released += adm.group_claims
                self.ledger.settle(done, released)
            except LedgerError as e:
                # The batch is recorded in the outbox; what is lost here is unused budget
                # (never an overshoot) and claims that expire on their own.
                self._failed(e)


class _GateMetrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.ledger_up = Gauge("triton_al_uploader_ledger_up",
                               "1 while the fleet's budget ledger answers, 0 while it does not (items that need it stay queued)",
                               registry=registry)
        self.ledger_up.set(1)
        self.ledger_errors = Counter("triton_al_uploader_ledger_errors", "Failed calls to the budget ledger, by kind: connection, timeout, auth (password, ACL), tls (certificates), error",
                                     ["kind"], registry=registry)
        self.fleet = Counter("triton_al_uploader_fleet_items",
                             "Items by what the ledger said: uploaded (claimed and in budget), elsewhere (another replica "
                             "delivered it: not uploaded again), held (another replica's claim, or the budget spent), "
                             "over_budget (dropped, --rate-overflow drop)", ["outcome"], registry=registry)
        for outcome in ("uploaded", "elsewhere", "held", "over_budget"):
            self.fleet.labels(outcome)

    def down(self, error: LedgerError) -> None:
        self.ledger_up.set(0)
        self.ledger_errors.labels(getattr(error, "kind", "error")).inc()

    def set_up(self) -> None:
        self.ledger_up.set(1)

    def admitted(self, adm: Admission) -> None:
        for outcome, items in (("uploaded", adm.upload), ("elsewhere", adm.elsewhere), ("held", adm.held), ("over_budget", adm.over)):
            if items:
                self.fleet.labels(outcome).inc(len(items))
