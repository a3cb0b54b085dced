"""The same batch on a Dask cluster: a LocalCluster of two worker processes on loopback.

The plan of the local test gives the same results on the cluster; a worker
killed with SIGKILL mid-item is replaced, the item runs again and continues
from its journal; no password is in a task key or a task's arguments.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from store_servers import MakeStore
from test_batch import (
    build_images,
    check_fleet,
    drive_holds,
    fleet,
    settings_for,
    upload_items,
    write_plan,
    xxh,
)

import drivepipe
from drivepipe.server import RunningServer

distributed = pytest.importorskip("distributed")
from drivepipe.jobs.dask_engine import DaskExecutor  # noqa: E402

#: the account of these tests' stores, which the workers find in their environment
USERNAME = "dask-tester@example.com"
PASSWORD = "dask-s3cret"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two worker processes, started once for the file (they take seconds to start)."""
    # The workers read the account from their environment, inherited from here.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CLOUDSIGMA_USERNAME", USERNAME)
        env.setenv("CLOUDSIGMA_PASSWORD", PASSWORD)
        with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                      host="127.0.0.1", dashboard_address=None) as lc, \
                distributed.Client(lc) as client:
            yield client


@pytest.fixture
def drive_store(make_drive_store: MakeStore, monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    """A store with the workers' account (this process uses it too)."""
    monkeypatch.setenv("CLOUDSIGMA_USERNAME", USERNAME)
    monkeypatch.setenv("CLOUDSIGMA_PASSWORD", PASSWORD)
    return make_drive_store(username=USERNAME, password=PASSWORD)


def test_the_plan_gives_the_same_results_on_dask(
    cluster: Any, drive_store: RunningServer, tmp_path: Path,
    put_drive: Callable[[RunningServer, bytes], str],
) -> None:
    items, raws, sources = fleet(drive_store, tmp_path, put_drive)
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    local = drivepipe.batch(str(write_plan(tmp_path / "here" / "plan.jsonl", items)), jobs=4,
                            settings=settings_for(drive_store))
    events: list[dict[str, Any]] = []
    plan = write_plan(tmp_path / "there" / "plan.jsonl", items)
    remote = drivepipe.batch(str(plan), executor=DaskExecutor(client=cluster),
                             settings=settings_for(drive_store), on_event=events.append)
    assert remote.ok, [(r.key, r.error) for r in remote.results if not r.ok]
    assert len(remote.results) == 21
    assert [(r.key, r.status, r.xxh128, r.size) for r in remote.results] == \
        [(r.key, r.status, r.xxh128, r.size) for r in local.results]
    check_fleet(drive_store, remote, raws, sources)
    assert not {r.uuid for r in remote.results[:16]} & {r.uuid for r in local.results[:16]}
    assert {r.worker for r in remote.results} == set(cluster.scheduler_info()["workers"])
    # progress came back to this process
    assert {e["key"] for e in events if e["event"] == "start"} == {r.key for r in remote.results}
    assert any(e["event"] == "progress" for e in events)
    # a rerun on the cluster checks the drives and files there and skips every item
    again = drivepipe.batch(str(plan), executor=DaskExecutor(client=cluster),
                            settings=settings_for(drive_store))
    assert again.counts == {"skipped": 21}


def test_placement_and_no_password_in_tasks(
    cluster: Any, drive_store: RunningServer, tmp_path: Path
) -> None:
    images = build_images(tmp_path / "images", 3)
    first = sorted(cluster.scheduler_info()["workers"])[0]
    items = [{**item, "workers": [first]} for item in upload_items(images)]
    plan = write_plan(tmp_path / "plan.jsonl", items)
    executor = DaskExecutor(client=cluster)
    report = drivepipe.batch(str(plan), executor=executor, settings=settings_for(drive_store))
    assert report.ok and {r.worker for r in report.results} == {first}
    password = drive_store.password
    assert executor.keys and not any(password in key for key in executor.keys)
    specs = cluster.run_on_scheduler(
        lambda dask_scheduler: [repr(ts.run_spec) + repr(ts.key)
                                for ts in dask_scheduler.tasks.values()])
    assert specs and not any(password in spec for spec in specs)


def test_a_worker_killed_mid_item_is_replaced_and_the_item_resumes(
    cluster: Any, drive_store: RunningServer, tmp_path: Path
) -> None:
    images = build_images(tmp_path / "images", 2, base=1 << 20)
    items = [{**item, "chunked": True} for item in upload_items(images)]
    plan = write_plan(tmp_path / "plan.jsonl", items)
    journals = tmp_path / "plan.jsonl.state.json.journals"
    drive_store.faults.delay(0.05, count=0, match="/chunk/")
    pids = cluster.run(os.getpid)
    executor = DaskExecutor(client=cluster)
    killed: list[str] = []

    def confirmed(key: str) -> bool:
        try:
            return bool(json.loads((journals / f"{key}.upload.json").read_text())["confirmed"])
        except (OSError, ValueError, KeyError):
            return False

    def kill_the_first_worker_with_confirmed_chunks() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for address, keys in cluster.processing().items():
                for key in keys:
                    item = str(key).split("-")[1]
                    if confirmed(item):
                        killed.append(item)
                        os.kill(pids[address], signal.SIGKILL)
                        return
            time.sleep(0.01)

    # the items' events arrive on the client's event loop: the killing is done elsewhere
    killer = threading.Thread(target=kill_the_first_worker_with_confirmed_chunks)
    killer.start()
    report = drivepipe.batch(str(plan), executor=executor, settings=settings_for(drive_store))
    killer.join()
    drive_store.faults.clear()
    assert killed, "no worker was killed"
    assert report.ok, [(r.key, r.error) for r in report.results if not r.ok]
    victim = next(r for r in report.results if r.key == killed[0])
    assert victim.resumed, "the item started over instead of resuming its journal"
    assert victim.bytes < victim.size  # (the resumed run sent only what was missing)
    raws = list(images.values())
    for n, result in enumerate(report.results):
        assert result.xxh128 == xxh(raws[n])
        assert drive_holds(drive_store, result.uuid or "", raws[n])
    assert not list(journals.glob("*.upload.json"))
    deadline = time.monotonic() + 30
    while len(cluster.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # the nanny brings the worker back
    assert len(cluster.scheduler_info()["workers"]) == 2
