"""v* and `fastedit edit` across processes (gloo, 2 ranks on the CPU) against one process, on tiny models.

Starting a process costs ~10 s of imports, so the tests that start some are marked ``slow`` (``make test-slow``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from test_edit_api import HP, REQUESTS
from tiny_models import tiny_model, tiny_tokenizer

from fastedit.cli import cli
from fastedit.editing.engine import compute_targets
from fastedit.editing.hparams import EditHparams
from fastedit.editing.patch import Patch
from fastedit.editing.workers import run_in_workers
from fastedit.requests import as_requests
from fastedit.stats.distributed import gather_shares, shard_bounds, share_tasks

pytestmark = pytest.mark.distributed

FIVE = [
    *REQUESTS,
    {"case_id": "tower", "prompt": "The {} is located in", "subject": "Eiffel Tower", "target_new": "Rome"},
    {"case_id": "mozart", "prompt": "{} was born in", "subject": "Mozart", "target_new": "Tokyo"},
]


def _targets(_folder: str | None = None):
    # "fast" mode: one request per v* task, so two ranks have five tasks to share
    hp = EditHparams(**{**HP, "layers": (0, 1), "v_mode": "fast"})
    return compute_targets(tiny_model("llama"), tiny_tokenizer(), as_requests(FIVE), method="memit", hparams=hp)


def _targets_job(folder: str) -> None:
    """One rank: all targets (the ranks share the requests and gather them)."""
    values = _targets()
    torch.save(
        {"init": values.init, "targets": values.targets, "delta": values.delta, "info": values.info},
        Path(folder) / f"rank{dist.get_rank()}.pt",
    )


def test_shard_bounds_cover_every_item_once():
    for n in range(7):
        for world in (1, 2, 3, 4):
            shares = [shard_bounds(n, rank, world) for rank in range(world)]
            assert [i for lo, hi in shares for i in range(lo, hi)] == list(range(n))
            assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


def test_gather_shares_in_one_process_runs_the_whole_range_once():
    calls = []
    assert gather_shares(5, lambda lo, hi: calls.append((lo, hi)) or (lo, hi)) == [(0, 5)]
    assert gather_shares(0, lambda lo, hi: calls.append((lo, hi))) == []
    assert calls == [(0, 5)]  # nothing to do, nothing run


def test_share_tasks_in_one_process_runs_every_task_in_order():
    done = []
    assert share_tasks([2, 1, 3], lambda i: i * 10, progress=done.append) == [0, 10, 20]
    assert done == [2, 3, 6]  # the size finished so far, after each task
    assert share_tasks([], lambda i: i) == []


def _share_job(folder: str) -> None:
    """Rank 1 takes 0.4 s per task, rank 0 none: the ranks take the 12 tasks from a shared counter."""
    rank = dist.get_rank()
    seen = []

    def compute(i: int) -> tuple[int, int]:
        time.sleep(0.4 * rank)
        return i * i, rank

    results = share_tasks([1] * 12, compute, progress=seen.append)
    again = share_tasks([1] * 3, lambda i: (i, rank))  # a second call gets fresh counters
    torch.save({"results": results, "again": again, "seen": seen}, Path(folder) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ranks_share_tasks_as_they_free_up(tmp_path):
    run_in_workers(_share_job, str(tmp_path), 2)
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert got[0]["results"] == got[1]["results"]  # every rank receives all results, in task order
    assert [value for value, _ in got[0]["results"]] == [i * i for i in range(12)]
    by = [rank for _, rank in got[0]["results"]]
    assert by.count(0) >= 8  # the fast rank took most tasks (a static split would give each 6)
    assert by.count(1) + by.count(0) == 12
    assert [i for i, _ in got[0]["again"]] == [0, 1, 2]
    assert max(got[0]["seen"] + got[1]["seen"]) == 12  # progress counts what all ranks finished


@pytest.mark.slow
def test_two_ranks_give_the_targets_of_one_process(tmp_path):
    run_in_workers(_targets_job, str(tmp_path), 2)
    single = _targets()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert [i["case_id"] for i in got["info"]] == [r["case_id"] for r in FIVE]
        assert {i["rank"] for i in got["info"]} <= {0, 1}
        for name in ("init", "targets", "delta"):
            ref = getattr(single, name)
            assert got[name].shape == ref.shape
            assert float((got[name] - ref).abs().max() / ref.abs().max()) <= 1e-5, name


def _edit_args(tmp_path: Path, text_corpus: Path) -> list[str]:
    folder = tmp_path / "tiny"
    if not folder.exists():
        tiny_model("llama").save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        (tmp_path / "requests.json").write_text(json.dumps(FIVE))
        (tmp_path / "hp.json").write_text(json.dumps(HP))
    args = [str(tmp_path / "requests.json"), "--model", str(folder), "--hparams", str(tmp_path / "hp.json")]
    return [*args, "--corpus", str(text_corpus), "--dm", "2", "--stats-dir", str(tmp_path / "stats")]


def _same_patch(a: Path, b: Path) -> None:
    pa, pb = Patch.load(a), Patch.load(b)
    assert pa.metadata["case_ids"] == pb.metadata["case_ids"]
    assert pa.factors.keys() == pb.factors.keys()
    for layer, (a1, b1) in pa.factors.items():
        a2, b2 = pb.factors[layer]
        delta1, delta2 = a1.double() @ b1.double().T, a2.double() @ b2.double().T
        assert float((delta1 - delta2).norm() / delta2.norm()) <= 1e-5


@pytest.mark.slow
def test_workers_and_torchrun_edit_like_one_process(tmp_path, text_corpus):
    args = [*_edit_args(tmp_path, text_corpus), "--no-targets-cache"]
    single = CliRunner().invoke(cli, ["edit", *args, "--out", str(tmp_path / "single")], catch_exceptions=False)
    assert single.exit_code == 0, single.output

    workers = CliRunner().invoke(cli, ["edit", *args, "--workers", "2", "--out", str(tmp_path / "workers")])
    assert workers.exit_code == 0, workers.output
    assert workers.output.count("ES") == 1  # one table, from rank 0
    run = json.loads((tmp_path / "workers" / "run.json").read_text())
    assert run["processes"] == 2 and run["options"]["workers"] == 2
    _same_patch(tmp_path / "workers" / "patch.safetensors", tmp_path / "single" / "patch.safetensors")
    one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    two = json.loads((tmp_path / "workers" / "metrics.json").read_text())
    for phase in ("pre", "post"):
        for key in ("es", "ps", "ns"):
            assert two[phase][key] == pytest.approx(one[phase][key], abs=1e-6)

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "fastedit.cli", "edit", *args,
         "--out", str(tmp_path / "torchrun")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ES") == 1
    _same_patch(tmp_path / "torchrun" / "patch.safetensors", tmp_path / "single" / "patch.safetensors")


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_workers_fail_before_the_model_loads(tmp_path, text_corpus, value):
    args = [*_edit_args(tmp_path, text_corpus), "--model", "no-such-model", "--workers", value]
    result = CliRunner().invoke(cli, ["edit", *args])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--workers" in result.output and "no-such-model" not in result.output


@pytest.mark.slow
def test_a_workers_error_is_one_line(tmp_path, text_corpus):
    hp = tmp_path / "bad-hp.json"
    hp.write_text(json.dumps({**HP, "layers": [0, 7]}))  # found only once the model is loaded, in the workers
    args = [*_edit_args(tmp_path, text_corpus), "--hparams", str(hp), "--workers", "2", "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(cli, ["edit", *args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output and "layer" in result.output
    assert not (tmp_path / "x").exists()


SLEEPER = """
import os, time
from pathlib import Path

def sleep_long(folder):
    Path(folder, f"worker{os.getpid()}.pid").write_text("")
    time.sleep(300)
"""


def _worker_pids(folder: Path) -> list[int]:
    return [int(p.name[len("worker") : -len(".pid")]) for p in folder.glob("worker*.pid")]


def _alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.mark.slow
def test_workers_end_when_their_parent_is_killed(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    script = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from sleeper import sleep_long\n"
        "from fastedit.editing.workers import run_in_workers\n"
        f"if __name__ == '__main__': run_in_workers(sleep_long, {str(tmp_path)!r}, 2)\n"
    )
    (tmp_path / "parent.py").write_text(script)
    # Started the way a shell script starts a background job (`fastedit edit ... &`): SIGINT ignored, which the
    # workers inherit, so the SIGINT torch asks the kernel to send them when their parent dies does nothing.
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], preexec_fn=ignore_sigint)
    try:
        deadline = time.monotonic() + 120
        while len(_worker_pids(tmp_path)) < 2:
            assert parent.poll() is None, "the parent exited before its workers started"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        pids = _worker_pids(tmp_path)
        parent.send_signal(signal.SIGTERM)  # no clean-up runs in the parent
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), f"workers {pids} outlived their parent"
    finally:
        parent.kill()
        for pid in _worker_pids(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
