"""The tracking outbox on its own: a half-written record is never read, and delivering twice changes nothing.

Delivery goes to a real MLflow SQLite store; "a crash after MLflow took the
records but before they were counted" is made by putting back the outbox's
delivery state, then delivering again.
"""

from __future__ import annotations

import json

from distmaml.tracking.delivery import Delivery
from distmaml.tracking.outbox import Outbox, State, outbox_folder


def _metrics(step: int) -> dict:
    return {"kind": "metrics", "metrics": [["train_loss", 1.0 / step, 1_700_000_000_000 + step, step]]}


def test_a_half_written_record_is_dropped_and_never_read(tmp_path):
    box = Outbox(tmp_path / "tracking")
    assert box.append(_metrics(1)) == 0 and box.append(_metrics(2)) == 1
    with box.records.open("ab") as f:  # a crash in the middle of the third write
        f.write(b'{"kind":"metrics","metr')
    assert [n for n, _ in box.pending()] == [0, 1]  # the reader stops at the last newline
    box.close()
    again = Outbox(tmp_path / "tracking")  # reopened (the run resumed): the half line is gone
    assert again.count == 2 and not again.records.read_bytes().endswith(b"metr")
    assert again.append(_metrics(3)) == 2
    assert [r["metrics"][0][3] for r in again.all_records()] == [1, 2, 3]
    assert outbox_folder(tmp_path) == tmp_path / "tracking" == outbox_folder(tmp_path / "tracking")
    assert outbox_folder(tmp_path / "tracking" / "artifacts") is None


def test_delivering_again_after_a_lost_count_changes_nothing(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    box = Outbox(tmp_path / "run" / "tracking")
    box.append({"kind": "create", "key": "k1", "uri": uri, "experiment": "e", "run_name": "r", "tags": {},
                "start_time": 1_700_000_000_000})  # fmt: skip
    box.append({"kind": "params", "params": {"inner.lr": "0.01"}})
    for step in range(1, 6):
        box.append(_metrics(step))
    folder, rel = box.artifact_dir()
    (folder / "result.json").write_text(json.dumps({"steps": 5}))
    box.append({"kind": "artifacts", "dir": rel, "path": None})
    box.append({"kind": "end", "status": "FINISHED", "end_time": 1_700_000_100_000})
    ids: list[str] = []
    assert Delivery(box, uri, on_run_id=ids.append).send_pending() == 9
    assert box.undelivered() == 0 and box.state().run_id == ids[0]
    assert not (box.folder / rel).exists()  # delivered files are dropped once counted

    client = MlflowClient(tracking_uri=uri)
    run_id = ids[0]

    def seen() -> tuple:
        run = client.get_run(run_id)
        history = sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "train_loss"))
        exp = run.info.experiment_id
        return run.info.status, run.data.params, history, len(client.search_runs([exp])), run.info.end_time

    first = seen()
    assert first[0] == "FINISHED" and [h[0] for h in first[2]] == [1, 2, 3, 4, 5] and first[3] == 1
    assert [a.path for a in client.list_artifacts(run_id)] == ["result.json"]

    # a crash after MLflow took records 2..8 but before they were counted: sent again
    (box.folder / rel).mkdir(parents=True)
    (box.folder / rel / "result.json").write_text(json.dumps({"steps": 5}))
    box.save_state(State(2, run_id))
    again = Outbox(box.folder)
    assert Delivery(again, uri).send_pending() == 7
    assert seen() == first
    # and even the run's creation, forgotten: the run is found by its key, not made twice
    again.save_state(State(0, None))
    assert Delivery(Outbox(box.folder), uri).send_pending() == 9  # the artifacts' files are gone: they were sent
    assert seen() == first
