"""Fleet-wide near-duplicate entries: the near-duplicate index (`near_duplicates.py`) of every
uploader of a fleet shares its entries through the fleet's ledger (`--budget-ledger`, the same
Redis, the same namespace per sink), so that a near-copy arriving at replica B of an image
replica A queued or delivered to the same group is counted and not uploaded again. On whenever
the uploader has a ledger and an index (`--no-near-duplicate-share` keeps each index to itself).

- **Publishing.** Every entry an index adds (a screened item that was not a near-duplicate) is
  appended to a Redis Stream per (sink, group), `tal:{<sink>}:n:<group>` (beside the ledger's
  budget `:b:` and claim `:c:` keys, in their hash slot): the content hash, the two 256-bit
  hashes (64 bytes), the unit embedding (float32) and its model (`name/version`) when it has
  one, `added_at`, and the origin (the replica's owner id, as the ledger names it: host and
  outbox path), packed in one field (`encode`: a parser reads one value per entry, not eight). `XADD ... MAXLEN ~ --near-duplicate-max-entries`, and the stream expires
  `--near-duplicate-max-age` after its last entry. An entry that leaves an index undelivered
  (`forget`: dead-lettered, dropped over a budget) is published as a removal; eviction by age or
  size is not (each replica bounds its own index). One pipelined round trip per batch that
  added entries, sent right after the screening, before the batch is uploaded; the same trip
  reads the streams again (`publish_then_read`), which settles near-copies screened at the
  same moment on two replicas (below).
- **Reading.** Before screening a batch, the index reads what was appended to its groups'
  streams since its last read: one `XREAD` (non-blocking, every group of the batch in one
  command, `COUNT` 10,000 per stream and more round trips only when a stream has more) and adds
  the others' entries to the group (`origin` set, item id -1), so that a lookup sees them; its
  own are skipped; a removal removes the entry only if it is still the same replica's. A group
  seen for the first time catches up from the stream's retained history; the position read up
  to is kept per stream in the index file, so a restarted replica reads only what it missed.
- **Remote entries are kept in the index file**, like its own (column `origin`): they count
  against `max_entries`, expire by `max_age_s`, survive a restart, and the evidence stays where
  `triton-al outbox near-duplicates` shows it: a local near-copy of another replica's image is
  counted (`seen`) on that entry, listed with its `origin`.
- **Exact copies are the ledger's.** An item whose content hash is another replica's entry is
  the ledger's claims' business (with claims on, the default): it is not suppressed here but
  taken over as this replica's entry and passed on, and the claim says whether it was already
  delivered (recorded without an upload) or is being uploaded elsewhere (held). With
  `--no-fleet-claims` it is suppressed here like any copy at distance 0.
- **The ledger unreachable or answering wrongly.** Screening goes on with the index as it is
  (never dropped for sharing; held only as below, "A publication that gets no answer"); what it could not publish waits in memory (at most
  `max_entries` events) and goes with the next round trip that works; reading resumes from the
  last position, so it catches up. One log line per change of state, asked again with backoff
  (0.5 s doubling to 30 s): a ledger that does not answer costs one socket timeout (2 s) per
  try. While the ledger is down, claims (on by default) hold every group anyway (`ledger.py`),
  so a batch is screened only once it answers, after reading what it missed. A stream entry
  that cannot be used (wrong sizes, not a number, an unknown version, garbage) is skipped with
  a debug line.

**Near-copies screened at the same moment.** Two replicas screening near-copies of one image
together each miss the other's entry (each read before the other published) and both add
their own. The stream settles it: the XADD of an entry returns its place in the stream, and the
XREAD in the same round trip returns what the others published since the screening's read. An
entry of this batch near one another replica published before it (earlier in the stream) was
the later of the two: it is withdrawn (removed here, published as a removal in a round trip of
its own) and its item counted as the earlier one's near-duplicate, not uploaded; the replica
that published first finds nothing earlier and uploads. Every replica applies the same rule to
the same order, so exactly one of the two is uploaded
(`triton_al_uploader_near_duplicate_share_settled_total` counts the withdrawn ones).

**A publication that gets no answer.** With claims on (the default), a batch is uploaded only
after its new entries' round trip answered: otherwise the index withdraws them (a removal is
published for each, since a lost reply does not say whether Redis added it) and the uploader
holds the batch (`UnsettledScreening`; the claims would hold it while the ledger is down
anyway; no batch is even hashed until the backoff is over) and screens it again once the
ledger answers, as if new. The entries are written to the index file as unsettled
(`near_duplicates.WRITTEN`) before the round trip and marked settled after it, so a replica
killed in between withdraws them at its next start (their items are still queued) and
screens those items again; eviction over `max_entries` waits for the answer too. Without
claims, or when the ledger answered with something unusable (a key of the wrong type would
hold a group for ever), nothing waits for the fleet: the batch goes on, its entries stay
(`LATE`) and are published by the next round trip that works, or at the next start.

The windows left: without claims, or with a ledger answering wrongly, two near-copies
screened at the same moment may both be uploaded. A replica killed after its publication
reached Redis but before it marked the entries settled (between one reply and one SQLite
write) withdraws and publishes them again; a replica that meanwhile gave way to the first
publication may then have given way for nothing. An exact copy taken over from another
replica's entry is not published again (if that replica then dead-letters its item, the
others forget the entry, though this replica delivered it).

What it costs (`python benchmarks/near_duplicates_share_cost.py`, a real local redis-server, 2 cores
under a load of ~3.3): one XREAD round trip per batch screened, ~1 ms for 3 groups with 16 new
entries (median; p90 1.3 ms), and one pipelined XADD + XREAD round trip per batch that added
entries; a batch of 16 PNGs over 3 groups screens in ~9.7 ms shared against ~6.2 ms alone (the
rest is hashing; reading back in the publishing trip added ~0.7 ms, benchmarks/RESULTS.md). Catch-up of 100,000 entries (a hash and a 64-value embedding each; ~50 MB in Redis):
~3 s to read and decode, ~5 s with indexing and storing them, once per group for a new replica;
a restarted one reads only what it missed. Publishing costs Redis ~500 bytes per entry with a
64-value embedding (MAXLEN bounds it per group).
"""

from __future__ import annotations

import logging
import math
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from triton_al.config import validate_group_name

log = logging.getLogger("triton_al.uploader")

FORMAT = 1
"""The version of a stream entry's layout (its first byte); entries of another version are skipped."""
READ_COUNT = 10_000
"""Stream entries read per stream per XREAD (a longer backlog takes more round trips)."""
HASH_BYTES = 64  # near_duplicates.WORDS little-endian uint64 words
WORDS_ = HASH_BYTES // 8
MAX_TEXT = 512
_HEAD = struct.Struct("<BBBdHHHH")  # version, op (0 add, 1 del), flags (1: a hash), added_at, then the lengths of
# the key, the origin, the model (bytes) and the embedding (values); then those, in the order key, origin, hash, model, embedding
_OPS = ("add", "del")
FIELD = b"d"
"""The one field of a stream entry: the whole entry packed (one field parses ~8x faster than one per value)."""


@dataclass(frozen=True)
class Event:
    """One index change, as published: an entry added (its features) or removed."""

    op: str
    """"add" or "del"."""
    group: str
    key: str
    """The content hash."""
    origin: str
    added_at: float = 0.0
    hash: np.ndarray | None = None
    """uint64 [8], or None (not hashed)."""
    model: str | None = None
    embedding: np.ndarray | None = None
    """Unit float32, or None."""
    stream_id: str = field(default="", compare=False)
    """Where it was read in its stream ("" until read): orders the fleet's entries."""


def encode(e: Event) -> dict[bytes, bytes]:
    """A stream entry's fields: `d`, the event packed (see `_HEAD`)."""
    key, origin = e.key.encode(), e.origin.encode()
    h = b"" if e.op != "add" or e.hash is None else np.asarray(e.hash, "<u8").tobytes()
    with_embedding = e.op == "add" and e.embedding is not None and e.model is not None
    model = e.model.encode() if with_embedding else b""
    v = np.asarray(e.embedding, "<f4").tobytes() if with_embedding else b""
    head = _HEAD.pack(FORMAT, _OPS.index(e.op), 1 if h else 0, float(e.added_at), len(key), len(origin), len(model), len(v) // 4)
    return {FIELD: head + key + origin + h + model + v}


def _text(b: bytes) -> str:
    if not 0 < len(b) <= MAX_TEXT:
        raise ValueError(f"a text of {len(b)} bytes")
    text = b.decode("utf-8")
    if not text.isprintable() or text != text.strip():
        raise ValueError("a text that is not printable")
    return text


def decode(group: str, fields: Any, stream_id: str = "") -> Event:
    """A stream entry's fields as an Event; ValueError (saying why) for anything unusable."""
    from triton_al.uploader.near_duplicates import EMBEDDING_MAX_DIM, unit_embedding

    if not isinstance(fields, dict):
        raise ValueError(f"fields are a {type(fields).__name__}")
    data = fields.get(FIELD, fields.get(FIELD.decode()))
    if not isinstance(data, bytes) or len(data) < _HEAD.size:
        raise ValueError(f"no field {FIELD.decode()!r} of at least {_HEAD.size} bytes")
    version, op, flags, added_at, nk, no, nm, dim = _HEAD.unpack_from(data)
    if version != FORMAT:
        raise ValueError(f"layout version {version}, expected {FORMAT}")
    if op >= len(_OPS) or flags > 1:
        raise ValueError(f"op {op}, flags {flags}")
    nh = HASH_BYTES if flags else 0
    if len(data) != _HEAD.size + nk + no + nh + nm + 4 * dim:
        raise ValueError(f"{len(data)} bytes, not what its lengths say")
    at = _HEAD.size
    key, origin = _text(data[at:at + nk]), _text(data[at + nk:at + nk + no])
    if _OPS[op] == "del":
        return Event("del", group, key, origin, stream_id=stream_id)
    if not math.isfinite(added_at):
        raise ValueError("added_at is not finite")
    at += nk + no
    h = np.frombuffer(data, "<u8", WORDS_, at).astype(np.uint64) if flags else None
    at += nh
    model, v = None, None
    if dim or nm:
        if not 1 <= dim <= EMBEDDING_MAX_DIM:
            raise ValueError(f"an embedding of {dim} values (1-{EMBEDDING_MAX_DIM})")
        model = _text(data[at:at + nm])
        v = np.frombuffer(data, "<f4", dim, at + nm).astype(np.float32)
        norm2 = float(v @ v)
        if not (math.isfinite(norm2) and abs(norm2 - 1.0) < 1e-4):  # published unit: anything else, checked in full
            v = unit_embedding(v)
    if h is None and v is None:
        raise ValueError("an entry with neither a hash nor an embedding")
    return Event("add", group, key, origin, added_at, h, model, v, stream_id)


def stream_order(stream_id: str) -> tuple[int, int]:
    """A stream ID ("<ms>-<seq>") as a key that sorts as Redis orders its entries."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class SharedEntries:
    """The Redis side of sharing: publishes an index's changes and reads the others'. Never
    raises for the ledger's sake: a failed read returns None, a failed publication waits."""

    def __init__(self, client: Any, prefix: str, owner: str, *, where: str = "redis", max_len: int = 100_000,
                 ttl_s: float = 30 * 86400.0, defer_exact: bool = True, read_count: int = READ_COUNT,
                 backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic, seed: int | None = None) -> None:
        if max_len <= 0 or not ttl_s > 0 or read_count <= 0:
            raise ValueError(f"max_len, ttl_s and read_count must be positive, got {max_len}, {ttl_s}, {read_count}")
        self.client, self.prefix, self.owner, self.where = client, prefix, owner, where
        self.max_len, self.ttl_ms, self.read_count = int(max_len), int(ttl_s * 1000), int(read_count)
        self.defer_exact = defer_exact
        """Exact copies (an item whose content hash is another replica's entry) are left to the claims."""
        self.backoff_base_s, self.backoff_cap_s, self.monotonic = backoff_base_s, backoff_cap_s, monotonic
        self._rng = random.Random(seed)
        self.up = True
        self.error = ""
        self.unreachable = False
        """The last failure was the ledger not answering (not an answer that could not be used)."""
        self.failures = 0
        self._retry_at = 0.0
        self.pending: deque[Event] = deque(maxlen=self.max_len)
        self.overflowed = 0
        """Waiting changes dropped because `max_len` others waited (the ledger down that long)."""
        self.skipped = 0
        """Stream entries that could not be used (skipped)."""
        self.round_trips = 0
        self.published = 0
        """Changes (entries added or forgotten) this replica published."""
        self.received = 0
        """Changes other replicas published that this one read."""
        self.settled = 0
        """Entries this replica withdrew: screened at the same moment as another replica's
        near-copy, which was published first (the index counts them as its near-duplicates)."""
        self.unanswered = 0
        """Batches whose new entries' publication got no answer (with claims on: held, screened again)."""

    @classmethod
    def for_ledger(cls, ledger: Any, **kwargs: Any) -> SharedEntries:
        """Sharing through a `ledger.Ledger`: its client, namespace (per sink) and owner id."""
        return cls(ledger.client, ledger.prefix, ledger.owner, where=ledger.where, **kwargs)

    def describe(self) -> str:
        return f"shared through the budget ledger {self.where}"

    def stream_key(self, group: str) -> str:
        return f"{self.prefix}:n:{validate_group_name(group)}"

    # State -------------------------------------------------------------------------

    def ready(self) -> bool:
        """Up, or its backoff over: a call now asks the ledger."""
        return self.up or self.monotonic() >= self._retry_at

    def enqueue(self, events: Iterable[Event]) -> None:
        """Events to publish with the next round trip that works (past `max_len` waiting, the
        oldest are dropped: counted in `overflowed`)."""
        for e in events:
            if len(self.pending) == self.max_len:
                self.overflowed += 1
            self.pending.append(e)

    def _failed(self, what: str, error: BaseException) -> None:
        import redis

        self.unreachable = isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError))
        self.failures += 1
        delay = max(0.05, self._rng.uniform(0.5, 1.0) * min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(self.failures, 20)))
        self._retry_at = self.monotonic() + delay
        self.error = f"near-duplicate sharing through the budget ledger {self.where}: {what} failed ({type(error).__name__}: {error})"
        if self.up:  # once per change of state
            log.warning("%s; screening with this replica's index alone (nothing dropped for it; with claims "
                        "on, batches wait for it), "
                        "%d changes waiting to be published; asking again with backoff", self.error, len(self.pending))
        self.up = False

    def _answered(self) -> None:
        if not self.up:
            log.warning("near-duplicate sharing: the budget ledger %s answers again; catching up", self.where)
        self.up, self.error, self.failures, self.unreachable = True, "", 0, False

    # Publishing ----------------------------------------------------------------------

    def _queue_writes(self, pipe: Any, events: Iterable[Event]) -> int:
        streams = set()
        n = 0
        for e in events:
            key = self.stream_key(e.group)
            pipe.xadd(key, encode(e), maxlen=self.max_len, approximate=True)
            streams.add(key)
            n += 1
        for key in sorted(streams):
            pipe.pexpire(key, self.ttl_ms)
        return n

    def publish(self, events: Iterable[Event]) -> bool:
        """Append the events (with any still waiting) to their groups' streams, in one round
        trip; on failure they wait for the next one that works. True when published."""
        self.enqueue(events)
        if not self.pending or not self.ready():
            return False
        batch = list(self.pending)
        try:
            pipe = self.client.pipeline(transaction=False)
            self._queue_writes(pipe, batch)
            self.round_trips += 1
            answers = pipe.execute(raise_on_error=False)
            self._refused(batch, answers)
        except Exception as e:  # noqa: BLE001 - a redis error, a broken connection, anything: never the uploader's problem
            self._failed("publish", e)
            return False
        for _ in batch:
            self.pending.popleft()
        self.published += len(batch)
        self._answered()
        return True

    def withdraw(self, events: Iterable[Event]) -> None:
        """Events waiting to be published that no longer are to be (these very objects)."""
        gone = {id(e) for e in events}
        if gone:
            self.pending = deque((e for e in self.pending if id(e) not in gone), maxlen=self.max_len)

    def _refused(self, batch: list[Event], answers: list) -> None:
        """The answers to a pipeline that began with the XADDs of `batch`: an XADD refused alone
        (a key of another type where a stream belongs) loses that event, logged, so that one bad
        key cannot hold the others' publication forever; any other error raises."""
        import redis

        for event, answer in zip(batch, answers):
            if isinstance(answer, redis.exceptions.ResponseError) and "WRONGTYPE" in str(answer):
                log.warning("near-duplicate sharing: %s refused an entry of group %s (%s); not published", self.where,
                            event.group, answer)
        for answer in answers:
            if isinstance(answer, Exception) and not (isinstance(answer, redis.exceptions.ResponseError) and "WRONGTYPE" in str(answer)):
                raise answer

    # Reading -------------------------------------------------------------------------

    def read(self, cursors: Mapping[str, str]) -> dict[str, tuple[str, list[Event]]] | None:
        """What the other replicas published to these groups after each cursor (a stream ID;
        "0-0": the whole retained history): per group, the last ID read and the usable events
        (own ones skipped, bad ones skipped with a debug line). Also publishes what waits.
        None when the ledger did not answer (or answered wrongly)."""
        return self.publish_then_read([], cursors)[1]

    def publish_then_read(self, events: Iterable[Event], cursors: Mapping[str, str]
                          ) -> tuple[list[str | None], dict[str, tuple[str, list[Event]]] | None]:
        """Publish `events` (after any waiting), then `read`, in the same round trip: the
        stream ID each of `events` got (None where it was not published: it waits, or was
        refused), and what `read` returns. The IDs order these events among the others'."""
        events = list(events)
        self.enqueue(events)
        ids: list[str | None] = [None] * len(events)
        if not cursors or not self.ready():
            return ids, None
        out: dict[str, tuple[str, list[Event]]] = {g: (cursors[g] or "0-0", []) for g in cursors}
        waiting = list(self.pending)
        try:
            keys = {self.stream_key(g): g for g in cursors}
            at = {k: cursors[g] or "0-0" for k, g in keys.items()}
            while at:
                pipe = self.client.pipeline(transaction=False)
                if waiting:
                    self._queue_writes(pipe, waiting)
                pipe.xread(at, count=self.read_count)
                self.round_trips += 1
                answers = pipe.execute(raise_on_error=False)
                if waiting:  # published, whatever the XREAD answered
                    self._refused(waiting, answers[:-1])
                    published = answers[:len(waiting)]
                    if events and len(waiting) >= len(events):  # `events` are the last ones waiting
                        ids = [a.decode() if isinstance(a, bytes) else a if isinstance(a, str) else None
                               for a in published[-len(events):]]
                    for _ in waiting:
                        self.pending.popleft()
                    self.published += len(waiting)
                    waiting = []
                if isinstance(answers[-1], Exception):
                    raise answers[-1]
                full = self._absorb(answers[-1], keys, out)
                at = {k: out[keys[k]][0] for k in full}
        except Exception as e:  # noqa: BLE001 - see publish
            self._failed("read", e)
            return ids, None
        self._answered()
        return ids, out

    def _absorb(self, answer: Any, keys: dict[str, str], out: dict[str, tuple[str, list[Event]]]) -> list[str]:
        """Adds an XREAD answer to `out`; returns the streams that gave a full COUNT (more may follow)."""
        if answer is None:
            return []
        if isinstance(answer, dict):  # RESP3
            answer = [[k, v[0] if v and isinstance(v[0], list) and len(v) == 1 else v] for k, v in answer.items()]
        if not isinstance(answer, list):
            raise ValueError(f"XREAD answered a {type(answer).__name__}")
        full = []
        for stream in answer:
            if not isinstance(stream, (list, tuple)) or len(stream) != 2:
                raise ValueError(f"XREAD answered {str(stream)[:80]!r}")
            name = stream[0].decode() if isinstance(stream[0], bytes) else str(stream[0])
            group = keys.get(name)
            if group is None or not isinstance(stream[1], list):
                raise ValueError(f"XREAD answered a stream not asked for: {name[:80]!r}")
            last, events = out[group]
            for entry in stream[1]:
                if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                    raise ValueError(f"XREAD answered an entry {str(entry)[:80]!r}")
                last = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
                try:
                    event = decode(group, entry[1], last)
                except (ValueError, TypeError, struct.error) as e:
                    self.skipped += 1
                    log.debug("near-duplicate sharing: stream entry %s of group %s skipped: %s", last, group, e)
                    continue
                if event.origin != self.owner:
                    events.append(event)
                    self.received += 1
            out[group] = (last, events)
            if len(stream[1]) >= self.read_count:
                full.append(name)
        return full


class ShareCollector:
    """The sharing's state on the uploader's `/metrics`, read at scrape time."""

    def __init__(self, share: SharedEntries) -> None:
        self.share = share

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.share
        yield GaugeMetricFamily("triton_al_uploader_near_duplicate_share_up",
                                "1 while near-duplicate entries are shared through the budget ledger, 0 while it does not "
                                "answer (each replica then screens with its own index)", value=1 if s.up else 0)
        changes = CounterMetricFamily("triton_al_uploader_near_duplicate_share_changes",
                                      "Near-duplicate index changes (entries added or forgotten) shared through the ledger, "
                                      "by direction: published by this replica, received from the others", labels=["direction"])
        changes.add_metric(["published"], s.published)
        changes.add_metric(["received"], s.received)
        yield changes
        yield GaugeMetricFamily("triton_al_uploader_near_duplicate_share_waiting",
                                "Changes waiting to be published (the ledger did not answer)", value=len(s.pending))
        yield CounterMetricFamily("triton_al_uploader_near_duplicate_share_skipped",
                                  "Shared entries that could not be used (garbage, unknown format)", value=s.skipped)
        yield CounterMetricFamily("triton_al_uploader_near_duplicate_share_settled",
                                  "Items screened at the same moment as a near-copy on another replica that published "
                                  "first: not uploaded here (counted as its near-duplicates)", value=s.settled)
        yield CounterMetricFamily("triton_al_uploader_near_duplicate_share_unanswered",
                                  "Batches whose new entries' publication the ledger did not answer (with claims on: "
                                  "held and screened again once it answers)", value=s.unanswered)
