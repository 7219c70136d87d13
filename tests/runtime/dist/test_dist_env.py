"""DistEnv: the standard rendezvous variables (and Slurm's) parsed, or refused with the reason."""
import pytest

from llmc.runtime.dist import DistEnv, RendezvousError

BASE = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


def test_standard_variables():
    env = DistEnv.from_environ({**BASE, "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (1, 4, 1, "node0", 29500)
    assert env.local_world_size == 2 and env.source == "env" and not env.is_master
    assert DistEnv.from_environ(env.variables()) == env


def test_no_variables_is_one_process():
    env = DistEnv.from_environ({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single") and env.is_master


def test_local_rank_defaults_to_zero():
    env = DistEnv.from_environ({k: v for k, v in BASE.items() if k != "LOCAL_RANK"})
    assert env.local_rank == 0


def test_slurm_fallback_only_without_rank():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4",
             "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    env = DistEnv.from_environ(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (3, 8, 1, 4, "slurm")
    assert DistEnv.from_environ({**slurm, "SLURM_NTASKS_PER_NODE": "4(x2)"}).local_world_size is None
    assert DistEnv.from_environ({**slurm, **BASE}).rank == 1  # RANK wins over SLURM_PROCID


@pytest.mark.parametrize("change, message", [
    ({"RANK": "x"}, "RANK='x' is not an integer"),
    ({"RANK": "-1"}, "RANK=-1 is out of range"),
    ({"RANK": "4"}, "RANK=4 is outside the world: WORLD_SIZE=4 allows ranks 0..3"),
    ({"WORLD_SIZE": None}, "RANK=1 is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is out of range"),
    ({"MASTER_ADDR": None}, "MASTER_ADDR is not set"),
    ({"MASTER_PORT": None}, "MASTER_PORT is not set"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is out of range"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    ({"LOCAL_RANK": "one"}, "LOCAL_RANK='one' is not an integer"),
    ({"RANK": None}, "WORLD_SIZE=4 is set but RANK is not"),
])
def test_bad_variables_name_the_cause(change, message):
    env = {**BASE, **change}
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(RendezvousError) as e:
        DistEnv.from_environ(env)
    assert message in str(e.value)


def test_slurm_errors_name_slurm_variables():
    with pytest.raises(RendezvousError, match="SLURM_PROCID=2 is set but SLURM_NTASKS is not"):
        DistEnv.from_environ({"SLURM_PROCID": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
