"""The accelerate configs in configs/accelerate/ load with accelerate's own code, so a broken file fails CI.

Each file goes through what `accelerate launch --config_file FILE` does before it starts anything:
the config loader (unknown top-level keys, bad enum values), the launcher's merge of the file into
its arguments (where a misspelt nested key would be dropped silently, so each must be a launcher
option), and the environment the launcher hands to the processes. The FSDP file is then turned into
accelerate's FSDP plugin and its wrap policy is built on a tiny SD UNet, which fails if a class name
to wrap is wrong. Nothing here needs a GPU; nothing is launched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.launch import prepare_multi_gpu_env

from turbokit.tiny import tiny_components

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
EXPECTED = {
    "ddp_multi_gpu.yaml": DistributedType.MULTI_GPU,
    "multi_node.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
}
NESTED_PREFIX = {"fsdp_config": "fsdp_", "deepspeed_config": "", "dynamo_config": "dynamo_", "fp8_config": "fp8_"}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def _launch_args(path: Path):
    """The launcher's arguments for `accelerate launch --config_file PATH script.py`, defaults merged in."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[name]
    assert config.num_processes >= 2 and config.num_processes % config.num_machines == 0
    assert config.mixed_precision == "bf16"

    # Nested keys become launcher options by name; one that is no option would be ignored without a word.
    options = set(vars(launch_command_parser().parse_args(["train.py"])))
    for section, prefix in NESTED_PREFIX.items():
        for key in getattr(config, section) or {}:
            option = key if key.startswith(prefix) else prefix + key
            assert option in options, f"{name}: {section}.{key} is not an `accelerate launch` option"

    args, _ = _launch_args(path)
    assert args.num_processes == config.num_processes
    if config.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed's env needs deepspeed itself
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_multi_node_config_has_the_rendezvous_placeholders():
    config = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    assert config.num_machines == 2 and config.machine_rank == 0
    assert config.main_process_ip and config.main_process_port


def test_fsdp_config_shards_the_students_blocks():
    args, _ = _launch_args(CONFIGS / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    # ...which the plugin resolves against the current GPU at construction: there is none here.
    with patch_environment(**{**env, "FSDP_SYNC_MODULE_STATES": "false"}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    # what accelerate hands to FSDP1 (FullyShardedDataParallel(sharding_strategy=...)) at prepare()
    assert (plugin.sharding_strategy or plugin.reshard_after_forward).name == "FULL_SHARD"
    nested = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert nested["fsdp_sharding_strategy"] == nested["fsdp_reshard_after_forward"]
    assert plugin.use_orig_params and not plugin.cpu_ram_efficient_loading
    assert plugin.transformer_cls_names_to_wrap == ["BasicTransformerBlock", "ResnetBlock2D"]
    policy = plugin.auto_wrap_policy
    for family in ("sd2", "sdxl"):
        unet = tiny_components(family)["unet"]
        plugin.auto_wrap_policy = policy
        plugin.set_auto_wrap_policy(unet)  # what accelerate does at prepare(); raises on an unknown class name
        classes = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
        assert {c.__name__ for c in classes} == {"BasicTransformerBlock", "ResnetBlock2D"}
        units = [m for m in unet.modules() if plugin.auto_wrap_policy(m, recurse=False, nonwrapped_numel=0)]
        assert len(units) == sum(type(m) in classes for m in unet.modules()) > 0


def test_deepspeed_config_is_zero2():
    config = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    assert config.deepspeed_config["zero_stage"] == 2
    assert config.deepspeed_config["offload_optimizer_device"] == "none"
