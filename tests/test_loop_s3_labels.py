"""The loop through S3, for real and small: `triton-al serve` runs a real tritonserver with
the example model and the step, and its uploader delivers the flagged items to an
S3-compatible server (`rclone serve s3`) with `--pull-labels-every`; a script writes label
objects there, as an annotation tool would (class names, from the model's labels file); the
uploader's scheduled pull brings the labels and the labelled items into the local store;
`triton-al dataset export` (what `retrain --command` trains on) holds exactly them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from process_helpers import stop_process
from outbox_helpers import wait_for
from s3_helpers import BUCKET, SECRET, RcloneS3, client, s3_env
from triton_helpers import copy_repository, fashion_pngs, grpcclient, infer_al

from triton_al.outbox import content_hash
from triton_al.uploader.admin import AdminClient

GROUP = "active-learning"
PREFIX = "loop"


class Serve:
    """`triton-al serve` as users run it, stopped by PID."""

    def __init__(self, args: list[str], env: dict[str, str], log) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "triton_al.cli", "serve", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **env})

    def info(self, timeout: float = 180) -> dict:
        def ready():
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.text()}"
            lines = [line for line in self.text().splitlines() if line.startswith("serving: ")]
            return lines and json.loads(lines[-1][len("serving: "):])

        return wait_for(ready, timeout, "serve to be ready")

    def text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        stop_process(self.proc, 60)
        self._log.close()
        return self.proc.returncode


@pytest.mark.slow
def test_flagged_items_go_to_s3_and_their_labels_come_back_on_the_uploaders_schedule(tmp_path):
    s3 = RcloneS3(tmp_path / "s3")
    serve = None
    script = client(s3)
    try:
        repo = copy_repository(tmp_path)
        from triton_al.attach import set_step_parameter

        set_step_parameter(repo, "active_learning", "threshold", "0.9")  # flags a good share of the images
        labels_file = repo / "fashion_cnn" / "labels.txt"
        class_names = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
        data = tmp_path / "data"
        serve = Serve(["--model-repository", str(repo), "--data-dir", str(data), "--sink", f"s3://{BUCKET}/{PREFIX}",
                       "--pull-labels-every", "0.5", "--labels", str(labels_file), "--quiet"], s3_env(s3), tmp_path / "serve.log")
        info = serve.info()
        pngs, _, truth = fashion_pngs(60)
        with grpcclient.InferenceServerClient(info["grpc"]) as c:
            _, _, flagged = infer_al(c, pngs)
        flagged_at = [i for i in range(len(pngs)) if flagged[i]]
        assert 3 <= len(flagged_at) < 60
        with AdminClient(info["uploader_admin"]) as admin:
            assert admin.flush(60).complete
        hashes = {content_hash(pngs[i][0]): int(truth[i]) for i in flagged_at}
        in_s3 = s3.root / BUCKET / PREFIX / GROUP
        assert {p.stem for p in in_s3.glob("*.json")} == set(hashes)
        store = data / "store"
        assert not (store / GROUP / "index.jsonl").exists()  # delivered to S3, not to the local store

        # The annotators' work, written the way a script would: one label object per item.
        for h, k in hashes.items():
            script.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{GROUP}/labels/{h}.json",
                              Body=json.dumps({"label": class_names[k], "annotator": "script"}).encode())
        wait_for(lambda: all((store / GROUP / "labels" / f"{h}.json").exists() for h in hashes), 60,
                 "the uploader's scheduled pull to bring every label")
        with AdminClient(info["uploader_admin"]) as admin:
            pull = admin.status().label_pull
        assert pull.has_last and pull.labels_store == str(store)

        r = subprocess.run([sys.executable, "-m", "triton_al.cli", "dataset", "export", "--store", str(store), "--out",
                            str(tmp_path / "datasets"), "--format", "jsonl", "--labels", str(labels_file), "--val-fraction", "0"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        export = json.loads(r.stdout.strip().splitlines()[-1])
        assert export["items"] == len(hashes) and export["skipped"] == 0
        manifest = json.loads((tmp_path / "datasets" / "latest" / "manifest.json").read_text())
        assert {i["content_hash"]: i["label"] for i in manifest["items"]} == hashes
        for i in manifest["items"]:  # the images themselves came back, byte for byte
            assert content_hash((tmp_path / "datasets" / "latest" / i["file"]).read_bytes()) == i["content_hash"]
        assert serve.stop() == 0
        log = (data / "logs" / "uploader.log").read_text()
        assert "pulling labels from s3://" in log and SECRET not in log + serve.text()
    finally:
        script.close()
        if serve is not None:
            serve.stop()
        s3.stop()

