"""Turn a cluster's environment into one multi-node `accelerate launch` command per node.

Platforms name the same facts differently:

- plain / torchrun style: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE
- Huawei ModelArts: MA_NUM_HOSTS, MA_NUM_GPUS, VC_TASK_INDEX, VC_WORKER_HOSTS (first host is the
  master); no MA_VJ_NAME means a single-node job. In the legacy per-card boot mode (RANK_TABLE_FILE
  with ASCEND_DEVICE_ID) the platform starts our entry point once per card: only the first card's
  copy may launch, or every node would start N launchers.
- Volcano / Kubeflow PyTorchJob: WORLD_SIZE and RANK are set per *pod*, so they are the node count and
  node index, not process ranks; MASTER_ADDR/MASTER_PORT as usual.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tuner.errors import ConfigError

DEFAULT_PORT = 29500
# `job-worker-1` -> 1; anchored so that `worker-1` never matches inside `worker-10`.
_HOSTNAME_INDEX = re.compile(r"-(?:worker|master)-(\d+)$")


@dataclass(frozen=True)
class ClusterTopology:
    platform: str
    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int
    processes_per_machine: int
    # False on the per-card copies of a legacy ModelArts job that must not start a launcher.
    should_launch: bool = True


def detect_topology(env: Mapping[str, str], local_device_count: int, hostname: str = "") -> ClusterTopology:
    """Read the node count, node rank and master address from the platform's environment."""
    if "MA_NUM_HOSTS" in env or "VC_WORKER_HOSTS" in env or "MA_VJ_NAME" in env:
        return _modelarts(env, local_device_count)
    if "NNODES" in env or "NODE_RANK" in env:
        return ClusterTopology(
            platform="plain",
            num_machines=_int(env, "NNODES", 1),
            machine_rank=_int(env, "NODE_RANK", 0),
            main_process_ip=env.get("MASTER_ADDR"),
            main_process_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
            processes_per_machine=_int(env, "NPROC_PER_NODE", local_device_count),
        )
    if "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        rank = env.get("RANK")
        if rank is None:
            match = _HOSTNAME_INDEX.search(hostname)
            rank = match.group(1) if match else None
        if rank is None:
            raise ConfigError(
                "PyTorchJob environment has WORLD_SIZE but no RANK, and the hostname "
                f"{hostname!r} carries no node index",
                hint="set RANK or NODE_RANK for each pod",
            )
        return ClusterTopology(
            platform="pytorchjob",
            num_machines=_int(env, "WORLD_SIZE", 1),
            machine_rank=int(rank),
            main_process_ip=env["MASTER_ADDR"],
            main_process_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
            processes_per_machine=_int(env, "NPROC_PER_NODE", local_device_count),
        )
    return ClusterTopology("single", 1, 0, None, DEFAULT_PORT, max(local_device_count, 1))


def _modelarts(env: Mapping[str, str], local_device_count: int) -> ClusterTopology:
    per_node = _int(env, "MA_NUM_GPUS", local_device_count)
    per_card_boot = "RANK_TABLE_FILE" in env and "ASCEND_DEVICE_ID" in env
    should_launch = not per_card_boot or env["ASCEND_DEVICE_ID"].strip() in ("0", "")
    if "MA_VJ_NAME" not in env:
        return ClusterTopology("modelarts", 1, 0, None, DEFAULT_PORT, per_node, should_launch)
    hosts = [host.strip() for host in env.get("VC_WORKER_HOSTS", "").split(",") if host.strip()]
    num_machines = _int(env, "MA_NUM_HOSTS", len(hosts) or 1)
    if num_machines > 1 and not hosts:
        raise ConfigError(
            "ModelArts job with several hosts but VC_WORKER_HOSTS is empty",
            hint="run inside a ModelArts training job, or set VC_WORKER_HOSTS=host0,host1,...",
        )
    return ClusterTopology(
        platform="modelarts",
        num_machines=num_machines,
        machine_rank=_int(env, "VC_TASK_INDEX", 0),
        main_process_ip=hosts[0] if hosts else None,
        main_process_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
        processes_per_machine=per_node,
        should_launch=should_launch,
    )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not a whole number",
            hint=f"fix {name} in the job definition",
        ) from None


def accelerate_command(
    topology: ClusterTopology,
    tuner_args: Sequence[str],
    *,
    device_type: str = "cuda",
    mixed_precision: str | None = None,
) -> list[str]:
    """The `accelerate launch -m tuner ...` command line for this node."""
    if topology.num_machines > 1 and not topology.main_process_ip:
        raise ConfigError(
            "multi-node job without a master address",
            hint="set MASTER_ADDR (or VC_WORKER_HOSTS on ModelArts)",
        )
    total = topology.num_machines * topology.processes_per_machine
    command = [
        "accelerate",
        "launch",
        "--num_processes",
        str(total),
        "--num_machines",
        str(topology.num_machines),
        "--machine_rank",
        str(topology.machine_rank),
    ]
    if topology.num_machines > 1:
        command += [
            "--main_process_ip",
            str(topology.main_process_ip),
            "--main_process_port",
            str(topology.main_process_port),
        ]
    if total > 1 and device_type in ("cuda", "npu"):
        command.append("--multi_gpu")
    if mixed_precision and mixed_precision != "auto":
        command += ["--mixed_precision", mixed_precision]
    return [*command, "-m", "tuner", *tuner_args]


def collective_settings(
    device_type: str, socket_ifname: str | None = None, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Timeouts and the socket interface for HCCL (NPU) or NCCL (CUDA), keeping what the user set."""
    env = env or {}
    wanted: dict[str, str] = {}
    if device_type == "npu":
        # HCCL's default 120 s link timeout is shorter than the first-step op compilation on 910B.
        wanted |= {"HCCL_CONNECT_TIMEOUT": "1200", "HCCL_EXEC_TIMEOUT": "1200"}
        if socket_ifname:
            wanted["HCCL_SOCKET_IFNAME"] = socket_ifname
    else:
        wanted["NCCL_TIMEOUT"] = "1800"
        if socket_ifname:
            wanted["NCCL_SOCKET_IFNAME"] = socket_ifname
    if socket_ifname:
        wanted["GLOO_SOCKET_IFNAME"] = socket_ifname
    return {key: value for key, value in wanted.items() if key not in env}


def format_command(env_settings: Mapping[str, str], command: Sequence[str]) -> str:
    prefix = " ".join(f"{key}={shlex.quote(value)}" for key, value in env_settings.items())
    return (prefix + " " if prefix else "") + shlex.join(command)
