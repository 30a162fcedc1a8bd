"""`triton-al uploader --pull-labels-every`: the uploader, as a real process, delivers to a
real S3-compatible server (`rclone serve s3`) and brings the label objects a script writes
there back into a local project store on a schedule; failed pulls are counted and never
stop uploading; the admin status and /metrics show the pulls; bad flags are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from outbox_helpers import item, png, uploaders, wait_for  # noqa: F401
from s3_helpers import BUCKET, SECRET, client, s3, s3_env  # noqa: F401 - s3 is a fixture

from triton_al.outbox import Outbox, content_hash
from triton_al.uploader.admin import AdminClient

GROUP = "active-learning"
CLASSES = [f"class-{k}" for k in range(10)]


def fill(outbox, seeds) -> list[str]:
    with Outbox(outbox) as o:
        o.append_many([item(s) for s in seeds])
    return [content_hash(png(s)) for s in seeds]


def metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


def delivered(s3, prefix: str, hashes) -> bool:
    folder = s3.root / BUCKET / prefix / GROUP
    return all((folder / f"{h}.json").exists() for h in hashes)


def test_the_uploader_brings_labels_back_on_a_schedule(tmp_path, s3, uploaders):
    outbox, labels_store, prefix = tmp_path / "outbox.db", tmp_path / "labels-store", "scheduled"
    hashes = fill(outbox, range(4))
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    up = uploaders(outbox, None, "--pull-labels-every", "0.3", "--labels-store", str(labels_store),
                   "--labels", str(tmp_path / "classes.txt"), "--admin-port", "0", "--metrics-port", "0",
                   sink=f"s3://{BUCKET}/{prefix}", env=s3_env(s3))
    ports = up.ports()
    wait_for(lambda: delivered(s3, prefix, hashes), 30, "the items in S3")
    script = client(s3)
    try:
        for h, label in ((hashes[0], 3), (hashes[1], "class-7")):
            script.put_object(Bucket=BUCKET, Key=f"{prefix}/{GROUP}/labels/{h}.json",
                              Body=json.dumps({"label": label, "annotator": "script"}).encode())
        label_file = labels_store / GROUP / "labels" / f"{hashes[1]}.json"
        wait_for(lambda: label_file.exists() and (labels_store / GROUP / "labels" / f"{hashes[0]}.json").exists(), 30,
                 "the scheduled pull to bring both labels")
        assert json.loads(label_file.read_text())["label"] == 7
        index = [json.loads(line) for line in (labels_store / GROUP / "index.jsonl").read_text().splitlines()]
        assert sorted(r["content_hash"] for r in index) == sorted(hashes[:2])  # only the labelled items came back
        for record in index:
            assert content_hash((labels_store / GROUP / record["file"]).read_bytes()) == record["content_hash"]
        m = wait_for(lambda: (lambda m: m if m['triton_al_labels_pulled_total{kind="new"}'] == 2 else None)(metrics(ports["metrics"])),
                     10, "the metrics")
        assert m['triton_al_label_pulls_total{outcome="ok"}'] >= 1 and m['triton_al_label_pulls_total{outcome="failed"}'] == 0
        assert m["triton_al_label_pull_items_fetched_total"] == 2 and m["triton_al_label_pull_last_success_timestamp_seconds"] > 0
        # A label for a class the model does not have: reported (log, metric, status), not taken.
        script.put_object(Bucket=BUCKET, Key=f"{prefix}/{GROUP}/labels/{hashes[2]}.json", Body=json.dumps({"label": "zebra"}).encode())
        wait_for(lambda: metrics(ports["metrics"])["triton_al_label_pull_not_taken"] == 1, 10, "the unmappable label")
        with AdminClient(f"127.0.0.1:{ports['admin']}") as admin:
            status = wait_for(lambda: (lambda s: s if s.label_pull.last_not_taken == 1 else None)(admin.status()), 10, "the status")
        pull = status.label_pull
        assert pull.labels_store == str(labels_store) and pull.interval_seconds == pytest.approx(0.3) and pull.pulls >= 2
        assert pull.has_last and pull.last_outcome == "ok" and list(pull.upload_groups) == [GROUP] and pull.last_error == ""
        assert not (labels_store / GROUP / "labels" / f"{hashes[2]}.json").exists()
    finally:
        script.close()
    assert up.stop() == 0
    log = up.log()
    # Reported once, not at every pull while it stays unmappable.
    assert log.count(f"{GROUP}/{hashes[2]}: class 'zebra' is not a class of the model (10 classes)") == 1
    assert SECRET not in log


def test_a_local_sink_s_labels_are_copied_into_another_store_with_their_items(tmp_path, uploaders):
    """With the local sink (a team's store on a shared volume, say), --labels-store is another
    store: the labels annotators write in the sink come over, with the items they label."""
    outbox, team, mine = tmp_path / "outbox.db", tmp_path / "team", tmp_path / "mine"
    hashes = fill(outbox, range(40, 43))
    up = uploaders(outbox, team, "--pull-labels-every", "0.2", "--labels-store", str(mine))
    up.ports()
    wait_for(lambda: all((team / GROUP / f"{h}.json").exists() for h in hashes), 30, "the deliveries")
    from triton_al.sinks.local import LocalStore

    LocalStore(team).write_label(GROUP, hashes[1], 5, annotator="team")
    wait_for(lambda: (mine / GROUP / "labels" / f"{hashes[1]}.json").exists(), 30, "the label in the other store")
    assert json.loads((mine / GROUP / "labels" / f"{hashes[1]}.json").read_text())["annotator"] == "team"
    (record,) = [json.loads(line) for line in (mine / GROUP / "index.jsonl").read_text().splitlines()]
    assert record["content_hash"] == hashes[1] and (mine / GROUP / record["file"]).read_bytes() == png(41)
    assert up.stop() == 0


def test_a_failing_pull_is_counted_and_logged_and_uploading_goes_on(tmp_path, s3, uploaders):
    outbox, labels_store, prefix = tmp_path / "outbox.db", tmp_path / "labels-store", "failing"
    hashes = fill(outbox, range(10, 13))
    labels_store.mkdir()
    (labels_store / "labels-pull.json").mkdir()  # a store the pull cannot write its state into
    up = uploaders(outbox, None, "--pull-labels-every", "0.2", "--labels-store", str(labels_store), "--admin-port", "0",
                   "--metrics-port", "0", sink=f"s3://{BUCKET}/{prefix}", env=s3_env(s3))
    ports = up.ports()
    wait_for(lambda: metrics(ports["metrics"])['triton_al_label_pulls_total{outcome="failed"}'] >= 2, 30, "failed pulls")
    later = fill(outbox, range(20, 25))  # uploading goes on meanwhile
    wait_for(lambda: delivered(s3, prefix, hashes + later), 30, "the items in S3")
    with AdminClient(f"127.0.0.1:{ports['admin']}") as admin:
        wait_for(lambda: admin.status().counters.get("uploaded") == 8, 30, "the deliveries to be recorded")
        pull = admin.status().label_pull
        assert pull.last_outcome == "failed" and "labels-pull.json" in pull.last_error
    # Fixed: the next pull succeeds.
    (labels_store / "labels-pull.json").rmdir()
    script = client(s3)
    try:
        script.put_object(Bucket=BUCKET, Key=f"{prefix}/{GROUP}/labels/{later[0]}.json", Body=json.dumps({"label": 1}).encode())
    finally:
        script.close()
    wait_for(lambda: (labels_store / GROUP / "labels" / f"{later[0]}.json").exists(), 30, "a pull after the fix")
    # The label file is written during the pull; the counter moves when the pull returns.
    wait_for(lambda: metrics(ports["metrics"])['triton_al_label_pulls_total{outcome="ok"}'] >= 1, 30, "the pull counted")
    assert up.stop() == 0
    assert "label pull from" in up.log() and "failed (uploading goes on" in up.log()


def test_sigterm_during_pulls_stops_the_uploader_promptly(tmp_path, s3, uploaders):
    outbox = tmp_path / "outbox.db"
    fill(outbox, range(30, 32))
    up = uploaders(outbox, None, "--pull-labels-every", "0.05", "--labels-store", str(tmp_path / "labels"),
                   sink=f"s3://{BUCKET}/sigterm", env=s3_env(s3))
    up.ports()
    time.sleep(1.0)
    started = time.monotonic()
    assert up.stop() == 0
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("args, message", [
    (["--sink", "s3://bucket/p", "--pull-labels-every", "5"], "needs --labels-store DIR"),
    (["--store", "{tmp}/store", "--pull-labels-every", "5"], "the sink is the local project store itself"),
    (["--store", "{tmp}/store", "--pull-labels-every", "5", "--labels-store", "{tmp}/store/"], "the sink is the local project store itself"),
    (["--sink", "s3://bucket/p", "--labels-store", "{tmp}/l"], "give --pull-labels-every SECONDS too"),
    (["--sink", "s3://bucket/p", "--labels", "{tmp}/c.txt"], "--labels (class names for the label pull) needs --pull-labels-every"),
    (["--sink", "s3://bucket/p", "--pull-labels-every", "0", "--labels-store", "{tmp}/l"], "expected a positive number of seconds"),
    (["--sink", "s3://bucket/p", "--pull-labels-every", "5", "--labels-store", "{tmp}/l", "--once"], "run `triton-al labels pull` after it"),
    (["--sink", "s3://bucket/p", "--pull-labels-every", "5", "--labels-store", "{tmp}/l", "--labels", "{tmp}/none.txt"], "none.txt"),
])
def test_label_pull_flags_that_cannot_work_are_refused(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(tmp_path / "o.db"), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in " ".join(r.stderr.split())
    assert not (tmp_path / "o.db").exists()  # refused before touching the outbox


def test_serve_refuses_label_pull_flags_that_cannot_work(tmp_path):
    """`serve` checks them before starting Triton, with the uploader's messages (that it
    forwards them is shown by tests/test_loop_s3_labels.py, which serves for real)."""
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "serve", "--model-repository", str(tmp_path), "--data-dir",
                        str(tmp_path / "data"), "--pull-labels-every", "5"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "the sink is the local project store itself" in " ".join(r.stderr.split())
    assert not (tmp_path / "data" / "outbox.db").exists()  # refused before anything started
