"""The strategy group: what each config file turns into (the DeepSpeed JSON, the FSDP2
mixed-precision policy), and bad inputs as one-line errors, exit 2, nothing written."""

from __future__ import annotations

import os

import pytest
import torch

from dlmtrain import load_config
from dlmtrain.cli import main
from dlmtrain.distributed import prepare
from dlmtrain.distributed.deepspeed import deepspeed_config


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(["alpha", "beta", "gamma"], 8, 30, 0, "--val-fraction", "0.2")


def test_deepspeed_config_is_generated_from_ours():
    cfg = load_config("configs/demo.yaml", ["strategy=deepspeed_zero3", "optim.grad_clip=0.5",
                                            "strategy.reduce_bucket_size=1000", "strategy.overlap_comm=false"])
    assert deepspeed_config(cfg, micro_batch_size=4, on_gpu=False) == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 50_000_000,
                              "stage3_param_persistence_threshold": 100_000},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    z2 = deepspeed_config(load_config("configs/demo.yaml", ["strategy=deepspeed_zero2"]), 2, on_gpu=True)
    assert z2["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                       "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000}
    off = deepspeed_config(load_config("configs/demo.yaml", ["strategy=deepspeed_zero3_offload"]), 2, on_gpu=True)
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert off["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("name,kind,clip", [("ddp", "DDPStrategy", 1.0), ("deepspeed_zero2", "DeepSpeedStrategy", None),
                                            ("fsdp", "FSDP2Strategy", 1.0)])
def test_prepare_builds_the_strategy_and_leaves_clipping_to_deepspeed(name, kind, clip):
    from dlmtrain.modules import build_module

    cfg = load_config("configs/demo.yaml", [f"strategy={name}", "model.vocab_size=260", "optim.grad_clip=1.0",
                                            "trainer.activation_checkpointing=true"])
    module = build_module(cfg)
    args = prepare(cfg, module, world=2, micro=4, precision="32-true")
    assert type(args["strategy"]).__name__ == kind and args["gradient_clip_val"] == clip
    assert module.parallelize.activation_checkpointing and module.parallelize.fsdp == (name == "fsdp")


def test_fsdp2_shards_each_block_with_bf16_params_and_fp32_reduce(tmp_path):
    """One-process gloo group: fully_shard per block plus the root, MixedPrecisionPolicy
    bf16 parameters / float32 reduction under bf16-mixed; the module tree and names unchanged."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from dlmtrain.distributed.parallelize import fully_shard_backbone
    from dlmtrain.modules import build_module

    torch.set_num_threads(1)
    cfg = load_config("configs/demo.yaml", ["model.vocab_size=260"])
    module = build_module(cfg)
    names = [n for n, _ in module.named_parameters()]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        fully_shard_backbone(module, init_device_mesh("cpu", (1,)), bf16=True)
        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        assert units == [module.backbone, *module.backbone.blocks]
        for u in units:
            mp = u._get_fsdp_state()._mp_policy
            assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
        assert [n for n, _ in module.named_parameters()] == names
        assert all(p.dtype == torch.float32 for p in module.parameters())  # sharded master weights stay fp32
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overrides,needle", [
    (["strategy=zero9"], "no strategy config named 'zero9'"),
    (["strategy.name=megatron"], "strategy.name='megatron' is not one of"),
    (["trainer.strategy=bogus"], "trainer.strategy=bogus is not a Lightning strategy"),
    (["trainer.strategy=deepspeed_stage_2"], "DeepSpeed and FSDP are configured by the strategy group"),
    (["strategy=ddp", "trainer.strategy=ddp_spawn"], "are both set"),
    (["strategy=deepspeed_zero3_offload"], "training on CPU has nothing to offload"),
    (["strategy=ddp", "strategy.offload_optimizer=true"], "applies only to strategy.name=deepspeed"),
    (["strategy=fsdp", "strategy.offload_params=true"], "applies only to strategy.name=deepspeed"),
    (["strategy=deepspeed_zero2", "strategy.offload_params=true"], "with strategy.stage=3"),
    (["strategy=deepspeed_zero3", "strategy.allgather_bucket_size=5"], "with strategy.stage=1/2"),
    (["strategy=deepspeed_zero2", "strategy.stage=4"], "needs a ZeRO stage 1, 2 or 3"),
    (["strategy=deepspeed_zero1", "strategy.reshard_after_forward=false"], "applies only to strategy.name=fsdp"),
    (["strategy=fsdp", "strategy.stage=2"], "is a DeepSpeed option"),
])
def test_bad_strategy_inputs_are_one_line_exit_2_nothing_written(corpus, tmp_path, capsys, overrides, needle):
    run_dir = tmp_path / "run"
    rc = main(["train", "configs/demo.yaml", f"data.manifest={corpus}", f"run.dir={run_dir}", *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not run_dir.exists()
    os.environ.pop("DS_ACCELERATOR", None)
