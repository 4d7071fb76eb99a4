import pytest

from tuner.errors import ConfigError
from tuner.launch import accelerate_command, collective_settings, detect_topology


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_plain_environment():
    env = {
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "6000",
        "NPROC_PER_NODE": "8",
    }
    topology = detect_topology(env, local_device_count=4)
    command = accelerate_command(topology, ["train", "sdxl-lora", "--preset", "sdxl-910b"], device_type="npu")
    assert flag(command, "--num_processes") == "16"  # accelerate takes the total over all machines
    assert flag(command, "--num_machines") == "2" and flag(command, "--machine_rank") == "1"
    assert flag(command, "--main_process_ip") == "10.0.0.5" and flag(command, "--main_process_port") == "6000"
    assert "--multi_gpu" in command
    assert command[-5:] == ["tuner", "train", "sdxl-lora", "--preset", "sdxl-910b"]


def test_modelarts_multi_node_takes_first_worker_as_master():
    env = {
        "MA_VJ_NAME": "job",
        "MA_NUM_HOSTS": "3",
        "MA_NUM_GPUS": "8",
        "VC_TASK_INDEX": "2",
        "VC_WORKER_HOSTS": "job-worker-0.svc,job-worker-1.svc,job-worker-2.svc",
    }
    topology = detect_topology(env, local_device_count=1)
    assert (topology.num_machines, topology.machine_rank, topology.processes_per_machine) == (3, 2, 8)
    assert topology.main_process_ip == "job-worker-0.svc"


def test_modelarts_without_job_name_is_single_node():
    topology = detect_topology({"MA_NUM_GPUS": "8", "MA_NUM_HOSTS": "1"}, local_device_count=8)
    assert topology.num_machines == 1
    command = accelerate_command(topology, ["env"], device_type="npu")
    assert "--main_process_ip" not in command and flag(command, "--num_processes") == "8"


def test_modelarts_legacy_per_card_boot_launches_once_per_node():
    base = {"MA_VJ_NAME": "job", "MA_NUM_HOSTS": "1", "MA_NUM_GPUS": "8", "RANK_TABLE_FILE": "/rt.json"}
    assert detect_topology(base | {"ASCEND_DEVICE_ID": "0"}, 8).should_launch
    assert not detect_topology(base | {"ASCEND_DEVICE_ID": "3"}, 8).should_launch


def test_pytorchjob_world_size_is_the_node_count():
    env = {"WORLD_SIZE": "4", "RANK": "3", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
    topology = detect_topology(env, local_device_count=8)
    assert (topology.platform, topology.num_machines, topology.machine_rank) == ("pytorchjob", 4, 3)
    assert flag(accelerate_command(topology, []), "--num_processes") == "32"


@pytest.mark.parametrize(
    ("hostname", "rank"), [("job-worker-1", 1), ("job-worker-10", 10), ("job-master-0", 0)]
)
def test_node_index_from_hostname_is_anchored(hostname, rank):
    env = {"WORLD_SIZE": "11", "MASTER_ADDR": "job-master-0"}
    assert detect_topology(env, 1, hostname=hostname).machine_rank == rank


def test_missing_rank_and_unparsable_hostname_is_an_error():
    with pytest.raises(ConfigError, match="no node index"):
        detect_topology({"WORLD_SIZE": "2", "MASTER_ADDR": "m"}, 1, hostname="worker-1-extra")


def test_multi_node_without_master_is_refused():
    topology = detect_topology({"NNODES": "2", "NODE_RANK": "0"}, 8)
    with pytest.raises(ConfigError, match="master address"):
        accelerate_command(topology, [])


def test_bad_number_names_the_variable():
    with pytest.raises(ConfigError, match="NNODES"):
        detect_topology({"NNODES": "two"}, 1)


def test_collective_settings_keep_user_values():
    settings = collective_settings("npu", "eth0", env={"HCCL_CONNECT_TIMEOUT": "300"})
    assert "HCCL_CONNECT_TIMEOUT" not in settings
    assert settings["HCCL_EXEC_TIMEOUT"] == "1200" and settings["HCCL_SOCKET_IFNAME"] == "eth0"
    assert collective_settings("cuda", "ib0")["NCCL_SOCKET_IFNAME"] == "ib0"
