"""The rank-0 TCP store, rendezvous (every rank's info; missing ranks named after the timeout,
no hang) and the consistency check."""
import threading
import time

import pytest

from llmc.runtime.dist import RendezvousError, Store, StoreTimeout, check_consistent, rendezvous
from llmc.runtime.dist.errors import DistError
from llmc.runtime.dist.launch import free_port

from dist_ranks import launch_workers, run_threads


@pytest.fixture
def store_pair():
    port = free_port()
    host = Store("127.0.0.1", port, is_master=True, timeout=5)
    client = Store("127.0.0.1", port, is_master=False, timeout=5)
    yield host, client
    client.close()
    host.close()


def test_store_set_get_add_check(store_pair):
    host, client = store_pair
    client.set("a", b"\x00\x01binary")
    assert host.get("a") == b"\x00\x01binary"
    assert [host.add("n"), client.add("n", 5), host.add("n", 0)] == [1, 6, 6]
    assert client.check(["a", "b", "n"]) == ["a", "n"]
    client.delete("a")
    assert host.check(["a"]) == []


def test_store_get_blocks_until_set(store_pair):
    host, client = store_pair
    threading.Timer(0.2, lambda: host.set("late", b"v")).start()
    t0 = time.monotonic()
    assert client.get("late", timeout=5) == b"v"
    assert 0.1 < time.monotonic() - t0 < 4


def test_store_timeouts_name_the_missing_keys(store_pair):
    host, client = store_pair
    host.set("here", b"1")
    t0 = time.monotonic()
    with pytest.raises(StoreTimeout) as e:
        client.wait(["here", "absent"], timeout=0.3)
    assert e.value.missing == ["absent"] and time.monotonic() - t0 < 3
    with pytest.raises(StoreTimeout, match="'never'"):
        client.get("never", timeout=0.2)
    with pytest.raises(StoreTimeout):
        client.wait_count("n", 2, timeout=0.2)


def test_client_without_host_times_out():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(StoreTimeout, match="rank 0 did not arrive"):
        Store("127.0.0.1", port, is_master=False, timeout=0.5)
    assert time.monotonic() - t0 < 3


def test_port_in_use_is_a_clear_error(store_pair):
    host, _ = store_pair
    with pytest.raises(DistError, match="MASTER_PORT in use"):
        Store("127.0.0.1", host.port, is_master=True, timeout=1)


def test_host_exit_is_reported_to_clients():
    port = free_port()
    host = Store("127.0.0.1", port, is_master=True, timeout=5)
    client = Store("127.0.0.1", port, is_master=False, timeout=5)
    host.close()
    with pytest.raises(DistError, match="did rank 0 exit"):
        client.get("x", timeout=1)
    client.close()


def test_rendezvous_returns_every_info_in_rank_order():
    infos = run_threads(3, lambda env: rendezvous(env, {"rank": env.rank, "tp": 2, "shard": [env.rank, 3]},
                                                  timeout=10))
    for got in infos:
        assert got == [{"rank": r, "tp": 2, "shard": [r, 3]} for r in range(3)]


def test_repeated_rendezvous_are_separate_rounds():
    def body(env):
        first = rendezvous(env, {"round": 1, "rank": env.rank}, timeout=10)
        second = rendezvous(env, {"round": 2, "rank": env.rank}, timeout=10)
        return first, second
    for first, second in run_threads(3, body):
        assert [i["round"] for i in first] == [1, 1, 1] and [i["round"] for i in second] == [2, 2, 2]


def test_rendezvous_names_ranks_that_never_arrive():
    def body(env):
        if env.rank in (1, 3):
            return "absent"  # never calls rendezvous
        return rendezvous(env, {"rank": env.rank}, timeout=1.0)

    t0 = time.monotonic()
    out = run_threads(4, body)
    assert time.monotonic() - t0 < 10
    for r in (0, 2):
        assert isinstance(out[r], RendezvousError)
        assert "ranks 1, 3 of 4 did not arrive within 1 s" in str(out[r])


def test_rendezvous_refuses_non_json_info():
    out = run_threads(1, lambda env: rendezvous(env, {"x": object()}))
    assert isinstance(out[0], RendezvousError) and "JSON" in str(out[0])


def test_check_consistent_names_rank_and_field():
    ok = [{"tp": 2, "pp": 1, "fp": "abc"}] * 3
    check_consistent(ok, ["tp", "pp", "fp"])
    bad = [{"tp": 2, "pp": 1, "fp": "abc"}, {"tp": 4, "pp": 1, "fp": "abc"}, {"tp": 2, "fp": "abd"}]
    with pytest.raises(RendezvousError) as e:
        check_consistent(bad, ["tp", "pp", "fp"])
    msg = str(e.value)
    assert "rank 1 has tp=4, rank 0 tp=2" in msg
    assert "rank 2 has no 'pp'" in msg and "rank 2 has fp='abd', rank 0 fp='abc'" in msg
    assert "rank 1 has pp" not in msg


def test_inconsistent_ranks_in_real_processes(tmp_path):
    result, _, err = launch_workers("inconsistent", 3, tmp_path, timeout=60)
    assert not result.ok and result.exit_code == 1
    assert "rank 1 has tp=4, rank 0 tp=2" in result.report()
    assert "rank 1 has artifact='abd', rank 0 artifact='abc'" in err
