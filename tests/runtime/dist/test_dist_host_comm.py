"""HostComm between real processes (2 and 4 ranks) on random data, against numpy; sub-groups;
mismatched calls and a peer that leaves give a DistError, not garbage or a hang."""
import numpy as np
import pytest

from llmc.runtime.dist import Communicator, DistError, HostComm, tp_pp_groups

from dist_ranks import launch_workers, run_threads
from dist_workers import data


@pytest.mark.parametrize("n", [2, 4])
def test_collectives_match_numpy(tmp_path, n):
    seed = int(np.random.default_rng().integers(1 << 30))  # fresh data each run
    result, _, err = launch_workers("collectives", n, tmp_path, seed, timeout=60)
    assert result.ok, result.report() + err
    got = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n)]
    for dt in ("float32", "float64", "int64"):
        want = sum(data(seed, r, (7, 33), dt).astype(np.float64) for r in range(n))
        for r in range(n):
            a = got[r][f"all_reduce_{dt}"]
            assert a.dtype == np.dtype(dt)
            if dt == "int64":
                np.testing.assert_array_equal(a, want.astype(np.int64))
            else:
                np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(a, got[0][f"all_reduce_{dt}"])  # bit-identical on every rank
    want = sum(data(seed + 1, r, (300_000,), "float32").astype(np.float64) for r in range(n))
    for r in range(n):
        np.testing.assert_allclose(got[r]["all_reduce_big"], want, rtol=1e-5, atol=1e-5)
    want = np.concatenate([data(seed + 2, r, (3, 5), "float32") for r in range(n)])
    bcast = data(seed + 3, n - 1, (11,), "float32")
    for r in range(n):
        np.testing.assert_array_equal(got[r]["all_gather"], want)
        np.testing.assert_array_equal(got[r]["broadcast"], bcast)
        np.testing.assert_array_equal(got[r]["ring_recv"], data(seed + 4, (r - 1) % n, (64, 9), "float32"))
        # TP groups {0,1}, {2,3}: keyed by -rank, so the higher rank is group rank 0
        pair = [r // 2 * 2 + 1, r // 2 * 2] if r // 2 * 2 + 1 < n else [r]
        assert list(got[r]["tp_ranks"]) == pair and int(got[r]["tp_rank"]) == pair.index(r)
        want_tp = sum(data(seed + 5, q, (4,), "float32").astype(np.float64) for q in pair)
        np.testing.assert_allclose(got[r]["tp_sum"], want_tp, rtol=1e-6)
        assert bool(got[r]["split_none"]) == (r == 0)


def test_host_comm_is_a_communicator():
    out = run_threads(2, lambda env: HostComm.create(env, timeout=5))
    assert all(isinstance(c, Communicator) for c in out)
    with pytest.raises(DistError, match="device buffers need NcclComm"):
        out[0].all_reduce_device(1, 1, "float32")
    for c in out:
        c.close()


def test_communicators_of_one_name_made_again():
    def body(env):
        sums = []
        for k in range(3):  # the same name each time: each round connects afresh, none reads stale addresses
            c = HostComm.create(env, timeout=5, name="again")
            a = np.full(2, float(k + env.rank), np.float32)
            c.all_reduce(a)
            sums.append(float(a[0]))
            c.close()
        return sums
    out = run_threads(3, body)
    assert all(s == [3.0, 6.0, 9.0] for s in out), out


def test_world_of_one_needs_no_store():
    out = run_threads(1, lambda env: HostComm.create(env.__class__.single()))
    c = out[0]
    a = np.arange(3.0)
    c.all_reduce(a)
    d = np.empty(3)
    c.all_gather(a, d)
    np.testing.assert_array_equal(d, a)
    assert c.split(0).world_size == 1


def _pairs(fn):
    """Two ranks over HostComm; fn(comm) per rank; returns results/exceptions. A rank that
    raised closes its comm, as a process that exits would."""
    def body(env):
        comm = HostComm.create(env, timeout=5, name="pairs")
        try:
            return fn(comm)
        finally:
            comm.close()
    return run_threads(2, body)


def test_mismatched_shapes_are_named():
    out = _pairs(lambda c: c.all_reduce(np.zeros(5 if c.rank == 0 else 6, np.float32)))
    assert isinstance(out[0], DistError) and "rank 1 sent 24 bytes, rank 0 expects 20" in str(out[0])
    assert isinstance(out[1], DistError) and "closed its connection" in str(out[1])


def test_mismatched_calls_are_named():
    def fn(c):
        a = np.zeros(4, np.float32)
        if c.rank == 0:
            c.all_gather(a, np.zeros(8, np.float32))
        else:
            c.all_reduce(a)
    out = _pairs(fn)
    assert isinstance(out[0], DistError) and "rank 1 is in all_reduce while rank 0 is in all_gather" in str(out[0])


def test_bad_arguments():
    def fn(c):
        errors = []
        for call in (lambda: c.send(np.zeros(2), c.rank), lambda: c.send(np.zeros(2), 5),
                     lambda: c.all_reduce([1.0]), lambda: c.all_reduce(np.zeros((4, 4))[:, 1]),
                     lambda: c.all_gather(np.zeros((2, 3)), np.zeros((2, 3)))):
            try:
                call()
            except DistError as e:
                errors.append(str(e))
        c.barrier()
        return errors
    out = _pairs(fn)
    assert len(out[0]) == 5, out[0]
    assert "cannot exchange with itself" in out[0][0] and "not a rank of this group of 2" in out[0][1]
    assert "numpy array" in out[0][2] and "C-contiguous" in out[0][3]
    assert "dst must be float64(4, 3)" in out[0][4]


def test_tp_pp_groups():
    def body(env):
        world = HostComm.create(env, timeout=5, name="grid")
        tp, pp = tp_pp_groups(world, tp=2, pp=3)
        a = np.array([env.rank], np.int64)
        tp.all_reduce(a)
        b = np.array([env.rank], np.int64)
        pp.all_reduce(b)
        try:
            tp_pp_groups(world, tp=4, pp=2)
        except DistError as e:
            err = str(e)
        return tp.ranks, pp.ranks, int(a[0]), int(b[0]), err
    out = run_threads(6, body)
    for r, (tp_ranks, pp_ranks, a, b, err) in enumerate(out):
        stage, t = divmod(r, 2)
        assert tp_ranks == [2 * stage, 2 * stage + 1] and a == 4 * stage + 1
        assert pp_ranks == [t, t + 2, t + 4] and b == 3 * t + 6
        assert "tp=4 x pp=2 does not match the 6 ranks" in err


def test_bfloat16_arrays():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng()
    xs = [rng.standard_normal(64).astype(ml_dtypes.bfloat16) for _ in range(3)]

    def body(env):
        c = HostComm.create(env, timeout=5, name="bf16")
        a = xs[env.rank].copy()
        c.all_reduce(a)
        d = np.empty(3 * 64, ml_dtypes.bfloat16)
        c.all_gather(xs[env.rank], d)
        return a, d
    out = run_threads(3, body)
    want = ((xs[0] + xs[1]) + xs[2])  # bf16 additions in rank order, as rank 0 sums
    for a, d in out:
        assert a.dtype == xs[0].dtype
        np.testing.assert_array_equal(a.astype(np.float32), want.astype(np.float32))
        np.testing.assert_array_equal(d.astype(np.float32), np.concatenate(xs).astype(np.float32))
    exact = sum(x.astype(np.float64) for x in xs)
    np.testing.assert_allclose(out[0][0].astype(np.float64), exact, rtol=2e-2, atol=2e-2)
