"""The multi-process pieces of the training app that need no second process: SLURM's variables
translated into torchrun's, batch slices and their weights, and what a multi-process config may
not ask for."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments import parallel
from experiments.config import ConfigError
from experiments.evaluate import CONF_DIR

# what srun sets in task 3 of a 2-node × 2-task job step
SLURM_TASK = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu-a[07-08]",
}


def test_slurm_task_variables_become_torchruns():
    assert parallel.torch_env_from_slurm(SLURM_TASK) == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu-a07",
        "MASTER_PORT": str(20000 + 123456 % 20000),  # the same in every task of the job
    }
    assert parallel.world_size_from_env(SLURM_TASK) == 4
    given = {**SLURM_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "29500"}
    assert parallel.torch_env_from_slurm(given)["MASTER_ADDR"] == "head"
    assert parallel.torch_env_from_slurm(given)["MASTER_PORT"] == "29500"


def test_nothing_is_translated_under_torchrun_or_for_one_task():
    assert parallel.torch_env_from_slurm({**SLURM_TASK, "WORLD_SIZE": "2"}) == {}
    one = {**SLURM_TASK, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}
    assert parallel.torch_env_from_slurm(one) == {}
    assert parallel.torch_env_from_slurm({}) == {}
    assert parallel.world_size_from_env({}) == 1


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("node01", "node01"),
        ("node[3-5],gpu1", "node3"),
        ("gpu[09,11-12]", "gpu09"),
        ("rack[2-3]-n[01-04]", "rack2-n01"),
        ("a,b", "a"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert parallel.first_host(nodelist) == host


def test_an_empty_node_list_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST=''"):
        parallel.first_host("")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_weighted_slices_average_to_the_batch_mean(n, world):
    values = torch.arange(n, dtype=torch.float64) ** 2  # any per-row loss
    batch = torch.arange(n)  # an index batch, as the encoder objective yields
    slices = [parallel.shard(batch, r, world) for r in range(world)]
    taken = torch.cat([rows for rows, w in slices if w > 0])
    assert torch.equal(taken, batch)  # every row once, in order
    # what DDP computes: the mean over ranks of each rank's weighted mean
    ddp = sum(w * values[rows].mean() for rows, w in slices) / world
    torch.testing.assert_close(ddp, values.mean())
    # every rank takes part in every forward (with weight 0 when the batch has no row for it)
    assert all(len(rows) >= 1 for rows, _ in slices)


def test_lists_are_sliced_like_tensors():
    assert parallel.shard(["a", "b", "c"], 1, 2) == (["b", "c"], 4 / 3)
    assert parallel.shard(["a"], 0, 2) == (["a"], 0.0)  # idle: the first row, weight 0
    assert parallel.shard(["a"], 1, 2) == (["a"], 2.0)


def _cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["distributed.strategy=zero3"], 1, r"distributed\.strategy='zero3': must be one of"),
        (
            ["experiment=tiny_llama_persona", "objective.pcgrad=true"],
            2,
            r"objective\.pcgrad=true: not supported with several processes",
        ),
        (["distributed.strategy=fsdp2"], 2, r"train\.save_state=true: .*fsdp2"),
        (
            ["distributed.strategy=fsdp2", "train.resume_from=/some/state"],
            2,
            r"train\.resume_from: resuming is not supported with distributed\.strategy=fsdp2",
        ),
        (
            ["distributed.strategy=fsdp2", "train.save_state=false", "experiment=tiny_gpt2_heal"],
            2,
            r"objective=heal: .*use distributed\.strategy=ddp",
        ),
    ],
)
def test_what_a_multi_process_run_cannot_do_is_refused_at_startup(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        parallel.check(_cfg(*overrides), world)
