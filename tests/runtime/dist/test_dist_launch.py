"""The launcher: ranks get the standard variables; a rank that dies (exit code, SIGKILL) or
hangs in rendezvous ends the job within seconds with a report naming it; nothing is left
running; the CLI returns the failing rank's code."""
import os
import subprocess
import sys
import time

import pytest

from llmc.runtime.dist import DistEnv, DistError, LaunchError
from llmc.runtime.dist.launch import launch

from dist_ranks import WORKERS, launch_workers

PRINT_ENV = ("import os; print(' '.join(os.environ.get(k, '-') for k in "
             "('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'NCCL_NVLS_ENABLE', 'CUDA_VISIBLE_DEVICES', 'X')))")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(") ", 1)[1][0] != "Z"


def test_ranks_get_the_standard_variables(capsys, monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    result = launch([sys.executable, "-c", PRINT_ENV], 3, env={"X": "y"}, devices=["2", "0", "1"], master_port=29123)
    assert result.ok and result.exit_code == 0
    lines = sorted(capsys.readouterr().out.splitlines())
    assert lines == [f"[rank {r}] {r} 3 {r} 127.0.0.1 0 {d} y" for r, d in zip(range(3), "201")]


def test_callable_target_and_unlabeled_output(capsys):
    launch(_print_rank, 2, label=False)
    assert sorted(capsys.readouterr().out.split()) == ["hello-0", "hello-1"]


def _print_rank():
    print(f"hello-{DistEnv.from_environ().rank}")


@pytest.mark.parametrize("how, code, describe", [("exit3", 3, "exit code 3"),
                                                 ("sigkill", 137, "killed by signal SIGKILL")])
def test_a_dying_rank_stops_the_others(tmp_path, how, code, describe):
    t0 = time.monotonic()
    result, _, err = launch_workers("die", 3, tmp_path, 1, how, timeout=60, grace=3)
    assert time.monotonic() - t0 < 20  # the survivors sleep 120 s: they were stopped
    assert not result.ok and result.first_failure == 1 and result.exit_code == code
    report = result.report()
    assert report.startswith(f"rank 1 failed first: {describe}")
    assert "rank 1 about to die" in report  # its stderr tail
    assert "rank 0 (pid" in report and "stopped by the launcher" in report
    for st in result.ranks:
        assert not _alive(st.pid)
        if st.rank != 1:
            assert st.stopped and st.returncode == -15  # SIGTERM was enough
    assert "[rank 1] rank 1 about to die" in err


def test_a_rank_stuck_before_rendezvous_is_named(tmp_path):
    t0 = time.monotonic()
    result, _, _ = launch_workers("stuck", 3, tmp_path, 2, timeout=60, grace=3)
    assert time.monotonic() - t0 < 20
    assert not result.ok and result.first_failure in (0, 1)
    assert "rank 2 of 3 did not arrive within 2 s" in result.report()
    assert result.ranks[2].stopped and not _alive(result.ranks[2].pid)


def test_check_raises_with_the_report(tmp_path):
    with pytest.raises(LaunchError) as e:
        launch([sys.executable, "-c", "import os, sys; sys.exit(5 if os.environ['RANK'] == '1' else 0)"], 2,
               stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
    assert "rank 1 failed first: exit code 5" in str(e.value)
    assert e.value.result.exit_code == 5


def test_overall_timeout(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="did not finish within its timeout"):
        launch([sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout=1.0, grace=2)
    assert time.monotonic() - t0 < 10


def test_bad_arguments():
    with pytest.raises(DistError, match="devices given for 2 ranks"):
        launch(["true"], 2, devices=[0])
    with pytest.raises(DistError, match="master_port must be given"):
        launch(["true"], 2, nnodes=2, node_rank=1)
    with pytest.raises(DistError, match="cannot start"):
        launch(["/nonexistent/llmc-worker"], 1)


def test_cli_returns_the_failing_code_and_reports(tmp_path):
    cmd = [sys.executable, "-m", "llmc.runtime.dist.launch", "--nproc", "2", "--grace", "3", "--",
           sys.executable, str(WORKERS), "die", str(tmp_path), "0", "exit3"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3
    assert "launch: rank 0 failed first: exit code 3" in p.stderr
    assert "rank 1 (pid" in p.stderr and "stopped by the launcher" in p.stderr
    ok = subprocess.run([sys.executable, "-m", "llmc.runtime.dist.launch", "--nproc", "2", "--", sys.executable, "-c",
                         "print('fine')"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and sorted(ok.stdout.splitlines()) == ["[rank 0] fine", "[rank 1] fine"]
    assert "RuntimeWarning" not in ok.stderr


SLEEPER = "import os, sys, time; open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(str(os.getpid())); " \
          "time.sleep(100)"


@pytest.mark.parametrize("sig", [15, 9])
def test_ranks_end_with_the_launcher(tmp_path, sig):
    """SIGTERM: the launcher stops its ranks and exits 130; SIGKILL: the ranks get SIGTERM
    from the kernel (PR_SET_PDEATHSIG). Either way no rank outlives it."""
    p = subprocess.Popen([sys.executable, "-m", "llmc.runtime.dist.launch", "--nproc", "2", "--", sys.executable,
                          "-c", SLEEPER, str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < 2 or any(f.stat().st_size == 0 for f in tmp_path.iterdir()):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    pids = [int(f.read_text()) for f in tmp_path.iterdir()]
    p.send_signal(sig)
    p.wait(timeout=30)
    if sig == 15:
        assert p.returncode == 130 and "all ranks stopped" in p.stderr.read()
    deadline = time.monotonic() + 10
    while any(_alive(q) for q in pids):
        assert time.monotonic() < deadline, "a rank outlived its launcher"
        time.sleep(0.05)
