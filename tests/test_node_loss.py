"""A worker node lost mid-run, on a simulated cluster (``ray.cluster_utils.Cluster``: a head and
two worker nodes on this machine, every node on 127.0.0.1): the run re-schedules the lost work and
gives a clean run's picks, or, when what remains cannot fit the actor pools, fails within the
stall timeout with a message saying so. Never waits forever."""

from __future__ import annotations

import json
import math
import os
import threading
import time

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from cryosam_ray.cli import main  # noqa: E402
from cryosam_ray.tables import read_picks  # noqa: E402

from ribosome_data import ribosome_dataset  # noqa: E402

SMALL = ("ray.encoders.num_cpus=0.25", "ray.segmenters.num_cpus=0.25", "ray.task_cpus=0.25")
LOOPBACK = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}  # see conftest.py


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs: the driver only) and two 1-CPU worker nodes; shut down after the module."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **LOOPBACK})
    nodes.add_node(num_cpus=1, **LOOPBACK)
    nodes.add_node(num_cpus=1, **LOOPBACK)
    ray.init(address=nodes.address, log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root, data = ribosome_dataset(tmp_path_factory.mktemp("nodeloss"), (48, 96, 96))
    return root, data


def _run(data, prompts, out, address: str, *settings: str) -> int:
    extra = [arg for s in settings for arg in ("--set", s)]
    return main(["run", "--tomograms", str(data), "--prompts", str(prompts), "--out", str(out), "--address", address,
                 "--no-progress", *extra])


def _rows(table) -> list[tuple]:
    """A picks table's rows, NaN equal to NaN."""
    return [tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in row.values())
            for row in table.to_pylist()]


@pytest.fixture(scope="module")
def clean_picks(cluster, dataset):
    """The reference: the same run on the same cluster, no node lost (on Ray, the workers' BLAS
    runs one thread, so scores can differ from a run in this process in the last digit)."""
    root, data = dataset
    assert _run(data, root / "prompts.csv", root / "clean", cluster.address, *SMALL) == 0
    return _rows(read_picks(str(root / "clean" / "picks.parquet")))


def _segmenter_node(cluster: Cluster):
    """The worker node that holds the run's segmenter actor, once it is alive."""
    for actor in list_actors(filters=[("state", "=", "ALIVE")]):
        if "-segmenter-" in (actor.name or ""):
            return next((n for n in cluster.worker_nodes if n.node_id == actor.node_id), None)
    return None


def _run_and_remove_a_node(cluster, dataset, out, *settings):
    """Start a run on the cluster; once feature shards are written, remove the node holding its
    segmenter (with everything on it). Returns (exit code, seconds from the removal to the end)."""
    root, data = dataset
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault(
        "code", _run(data, root / "prompts.csv", out, cluster.address, *settings)))
    runner.start()
    deadline, removed_at = time.time() + 180, None
    while runner.is_alive() and removed_at is None and time.time() < deadline:
        node = _segmenter_node(cluster) if (out / "features").exists() else None
        if node is not None:
            cluster.remove_node(node)
            removed_at = time.time()
        time.sleep(0.2)
    runner.join(timeout=300)
    assert removed_at is not None, "the run ended before a node could be removed"
    assert not runner.is_alive(), "the run did not end after the node loss"
    cluster.add_node(num_cpus=1, **LOOPBACK)  # back to two workers for the next test
    return result["code"], time.time() - removed_at


def test_a_lost_node_is_replaced_and_the_picks_equal_a_clean_run(cluster, dataset, clean_picks, tmp_path):
    out = tmp_path / "out"
    code, _ = _run_and_remove_a_node(cluster, dataset, out, *SMALL)
    assert code == 0
    assert _rows(read_picks(str(out / "picks.parquet"))) == clean_picks


def test_pools_that_no_longer_fit_fail_within_the_stall_timeout(cluster, dataset, tmp_path):
    """Each 0.75-CPU actor needs a node of its own: after the loss the segmenter cannot restart."""
    out = tmp_path / "out"
    code, after = _run_and_remove_a_node(cluster, dataset, out, "ray.encoders.num_cpus=0.75",
                                         "ray.segmenters.num_cpus=0.75", "ray.task_cpus=0.125",
                                         "ray.stall_timeout_s=8")
    assert code == 1 and after < 60
    records = json.loads((out / "run.json").read_text())["tomograms"]
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert failed and all("no work finished for 8 s" in r["error"] for r in failed)
    assert "lower ray.*.num_cpus or add nodes" in failed[0]["error"]
