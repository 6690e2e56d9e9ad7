"""Scoring on 2 processes (torch.distributed, gloo, CPU) equals one process on the same images; a failed
process makes the other raise within the process group's timeout instead of hanging."""
from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import carfast
from carfast import data, models

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, mode: str, n: int):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=10))
        model = models.cifar_resnet(20)
        x, y = data.cifar10_test(n)
        if mode == "fail" and rank == 1:
            raise SystemExit(3)                     # this process dies before scoring
        shard = (x[rank::world], y[rank::world])    # each process its own images
        if mode == "prune":
            res = _prune_and_group(model, shard)
        elif mode == "race":
            res = _race(model, shard)
        else:
            res = {layer: carfast.score_layer(model, layer, shard, progress=False).to_dict()
                   for layer in ("layer1.0.conv1", "layer3.2.conv1")}
        torch.save({"ok": res}, out % rank)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - report what happened to the parent test
        torch.save({"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}, out % rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _prune_and_group(model, data) -> dict:
    """Greedy pruning (both schedules, CAR and a data-dependent baseline) and a group score, as plain data."""
    out = {}
    for key, kw in {"sequential": dict(layers=["layer3.2.conv1"], keep=61),
                    "global": dict(layers=["layer3.1.conv1", "layer3.2.conv1"], keep=62, schedule="global"),
                    "apoz": dict(layers=["layer3.2.conv1"], keep=62, criterion="apoz")}.items():
        r = carfast.prune(model, kw.pop("layers"), data, progress=False, **kw)
        out[key] = {"removed": r.removed, "history": [(h["layer"], h["filter"], h["correct"]) for h in r.history]}
    out["group"] = carfast.score_group(model, "layer3.0.conv2", data, filters=[0, 5, 9], progress=False).to_dict()
    return out


def _race(model, data) -> dict:
    """The raced search (sequential and global), as plain data: removals and the evaluations counted."""
    out = {}
    for key, kw in {"no_drops": dict(layers="layer1.0.conv1", keep=13, search=carfast.Race(delta=0, block=16)),
                    "race": dict(layers="layer1.0.conv1", keep=13, search=carfast.Race(block=16)),
                    "global": dict(layers=["layer1.0.conv1", "layer3.2.conv1"], keep=0.9, schedule="global",
                                   search=carfast.Race(block=16))}.items():
        r = carfast.prune(model, kw.pop("layers"), data, progress=False, **kw)
        out[key] = {"removed": r.removed, "history": [(h["layer"], h["filter"], h["correct"], h["evaluations"],
                                                       h["exhaustive"]) for h in r.history]}
    return out


def _spawn(tmp_path, mode: str, n: int):
    """Run the two ranks as separate processes (a rank's failure must not terminate the other) and
    return what each wrote: {"ok": scores} or {"error": message}, or None."""
    out = str(tmp_path / "rank%d.pt")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, out, mode, n)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
            pytest.fail("a scoring process hung")
    return [torch.load(out % r, weights_only=False) if os.path.exists(out % r) else None for r in range(2)]


def test_two_processes_equal_one(tmp_path):
    n = 160
    results = _spawn(tmp_path, "ok", n)
    assert all(r is not None and "ok" in r for r in results), results
    model = models.cifar_resnet(20)
    x, y = data.cifar10_test(n)
    for layer in ("layer1.0.conv1", "layer3.2.conv1"):
        one = carfast.score_layer(model, layer, (x, y), progress=False)
        for r in results:
            got = carfast.LayerScores.from_dict(r["ok"][layer])
            assert got.num_images == n
            assert torch.equal(got.correct, one.correct) and torch.equal(got.base_correct, one.base_correct)
            assert torch.equal(got.class_totals, one.class_totals)
            assert torch.allclose(got.loss_sum, one.loss_sum, rtol=1e-9)
            assert got.ranking().tolist() == one.ranking().tolist()
            assert got.pairs_evaluated + got.pairs_skipped == n * one.filters.numel()
        a, b = (carfast.LayerScores.from_dict(r["ok"][layer]) for r in results)
        assert torch.equal(a.loss_sum, b.loss_sum)   # every process gets the same scores


def test_a_failed_process_makes_the_other_raise(tmp_path):
    """Rank 1 dies before scoring; rank 0 raises a RuntimeError that says why, within the 10 s timeout."""
    results = _spawn(tmp_path, "fail", 64)
    assert results[1] is None                                 # rank 1 exited without a result
    err = results[0]
    assert err is not None and "error" in err, err
    assert "score_layer: the all-reduce of the scores over 2 processes failed on rank 0" in err["error"], err


def test_two_processes_prune_in_step_and_equal_one(tmp_path):
    """prune (sequential, global, a baseline) and score_group on 2 processes equal one process on all images."""
    n = 96
    results = _spawn(tmp_path, "prune", n)
    assert all(r is not None and "ok" in r for r in results), results
    model = models.cifar_resnet(20)
    x, y = data.cifar10_test(n)
    one = _prune_and_group(model, (x, y))
    for r in results:
        for key in ("sequential", "global", "apoz"):
            assert r["ok"][key] == one[key], key
        got, ref = (carfast.LayerScores.from_dict(d) for d in (r["ok"]["group"], one["group"]))
        assert torch.equal(got.correct, ref.correct) and got.num_images == n


def test_group_without_init_is_refused():
    model = models.cifar_resnet(20)
    x, y = data.cifar10_test(8)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        carfast.score_layer(model, "layer3.2.conv1", (x, y), process_group=object(), progress=False)


def test_the_readme_torchrun_example_runs(tmp_path):
    """examples/score_distributed.py under torchrun on 2 CPU processes (the README's command)."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "score_distributed.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
           script, "--images", "100", "--layer", "layer3.8.conv1", "--keep", "62"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes, 100 images" in run.stdout
    assert "CAR scores of 'layer3.8.conv1': 64 filters on 100 images" in run.stdout
    assert "on all 100 images (every process made the same removals)" in run.stdout


def test_group_is_the_deprecated_name_of_process_group():
    model = carfast.models.cifar_resnet(20)
    x, y = carfast.data.cifar10_test(8)
    with pytest.warns(DeprecationWarning, match="pass process_group="):
        a = carfast.score_layer(model, "layer3.2.conv1", (x, y), group=False, progress=False)
    b = carfast.score_layer(model, "layer3.2.conv1", (x, y), process_group=False, progress=False)
    assert torch.equal(a.correct, b.correct)
    with pytest.raises(TypeError, match="pass process_group= only"):
        carfast.score_layer(model, "layer3.2.conv1", (x, y), group=False, process_group=False, progress=False)


def test_two_processes_race_in_step(tmp_path):
    """The raced search on two processes: both make the same removals, with blocks global across them;
    with no drops it equals the exact search of one process on all the images."""
    n = 120
    res = _spawn(tmp_path, "race", n)
    assert all(r is not None and "ok" in r for r in res), res
    assert res[0]["ok"] == res[1]["ok"]
    got = res[0]["ok"]
    x, y = data.cifar10_test(n)
    model = models.cifar_resnet(20)
    exact = carfast.prune(model, "layer1.0.conv1", (x, y), keep=13, progress=False)
    assert got["no_drops"]["removed"] == exact.removed
    assert [h[2] for h in got["no_drops"]["history"]] == [h["correct"] for h in exact.history]
    for key in ("race", "global"):
        assert all(h[3] <= h[4] for h in got[key]["history"]) and got[key]["history"][0][4] > 0
