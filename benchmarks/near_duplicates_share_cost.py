"""Cost of fleet-wide near-duplicate sharing against a real local redis-server (Debian's,
started as tests/test_fleet.py does, stopped by PID): `python benchmarks/near_duplicates_share_cost.py`.

- Per batch: replica B screens 16 Fashion-MNIST PNGs spread over 3 groups while replica A
  published 16 entries to those groups since B's last read; the XREAD alone, and the whole
  `screen` (read, apply, screen, publish) against an index that does not share.
- Catch-up: 100,000 entries (a hash and a 64-value embedding each) in one group's stream; a
  replica new to the group screens one item (reads, decodes, indexes and stores them all), then
  the same replica restarted (its file and its stream position: nothing to read)."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_fleet import RedisServer  # noqa: E402

from triton_al.example.data import encode_png, load  # noqa: E402
from triton_al.outbox import content_hash  # noqa: E402
from triton_al.uploader.ledger import Ledger, owner_id  # noqa: E402
from triton_al.uploader.near_duplicates import NearDuplicateIndex, index_path  # noqa: E402
from triton_al.uploader.near_duplicates_share import Event, SharedEntries  # noqa: E402


def main(entries: int = 100_000, batches: int = 60) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-share-"))
    server = RedisServer(tmp / "redis")
    opened = []
    try:
        images, _ = load("test")

        def q(i: int, group: str) -> SimpleNamespace:
            a = encode_png(images[i % len(images)])
            return SimpleNamespace(id=i, upload_group=group, content_hash=content_hash(a), media_type="image/png", asset=a,
                                   model_name="m", model_version="1", embedding=None)

        def index(name: str, share: bool = True) -> NearDuplicateIndex:
            ledger = Ledger.open(server.url, "bench", owner_id(tmp / f"{name}.db"))
            shared = SharedEntries.for_ledger(ledger, max_len=entries, ttl_s=86400) if share else None
            ix = NearDuplicateIndex(index_path(tmp / f"{name}.db"), max_distance=20, max_embedding_distance=0.02,
                                    max_entries=entries, sink="bench", share=shared)
            opened.append((ix, ledger))
            return ix

        groups = ["g0", "g1", "g2"]
        a, b, alone = index("a"), index("b"), index("alone", share=False)
        read, shared_screen, alone_screen = [], [], []
        k = 0
        for _ in range(batches):
            a.screen([q(k + j, groups[j % 3]) for j in range(16)])
            k += 16
            cursors = {g: b._cursors.get(g, "0-0") for g in groups}
            t0 = time.perf_counter()
            b.share.read(cursors)  # what screen reads first (measured apart; screen reads it again)
            read.append(time.perf_counter() - t0)
            batch = [q(k + j, groups[j % 3]) for j in range(16)]
            k += 16
            t0 = time.perf_counter()
            b.screen(batch)
            shared_screen.append(time.perf_counter() - t0)
            batch = [q(k + j, groups[j % 3]) for j in range(16)]
            k += 16
            t0 = time.perf_counter()
            alone.screen(batch)
            alone_screen.append(time.perf_counter() - t0)

        def ms(xs: list[float]) -> str:
            xs = sorted(xs[10:])
            return f"median {1000 * statistics.median(xs):.2f} ms, p90 {1000 * xs[int(0.9 * len(xs))]:.2f} ms"

        print(f"XREAD of 3 groups (16 new entries):                  {ms(read)}")
        print(f"screen 16 PNGs over 3 groups, shared (read+publish):  {ms(shared_screen)}")
        print(f"screen 16 PNGs over 3 groups, alone:                  {ms(alone_screen)}")

        rng = np.random.default_rng(0)
        hashes = rng.integers(0, 2**63, (entries, 8), dtype=np.uint64)
        embeddings = rng.standard_normal((entries, 64)).astype(np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        publisher = SharedEntries(a.share.client, a.share.prefix, "publisher", max_len=entries)
        now = time.time()
        t0 = time.perf_counter()
        for s in range(0, entries, 5000):
            publisher.publish([Event("add", "big", f"{i:064x}", "publisher", now, hashes[i], "m/1", embeddings[i])
                               for i in range(s, min(entries, s + 5000))])
        key = publisher.stream_key("big")
        print(f"published {entries} entries in {time.perf_counter() - t0:.1f} s (5,000 per pipeline); stream: "
              f"{a.share.client.xlen(key)} entries, {a.share.client.memory_usage(key) / 1e6:.0f} MB in Redis")
        late = index("late")
        t0 = time.perf_counter()
        got = late.share.read({"big": "0-0"})
        print(f"catch-up XREAD + decode of {len(got['big'][1])} entries: {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        late.screen([q(10**7, "big")])
        print(f"catch-up, whole (first screen of the group: read, decode, index, file): {time.perf_counter() - t0:.2f} s "
              f"({late.sizes()['big']} entries)")
        late.close()
        t0 = time.perf_counter()
        again = index("late")
        again.screen([q(10**7 + 1, "big")])
        print(f"that replica restarted (its file and stream position; nothing new): {time.perf_counter() - t0:.2f} s")
    finally:
        for ix, ledger in opened:
            ix.close()
            ledger.close()
        server.stop()


if __name__ == "__main__":
    main()
