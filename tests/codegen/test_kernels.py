"""The backend switch (kernels.py) and launch-setting selection (tuning.py)."""
import pytest
import torch

from moec.codegen import MoecKernelError, kernels, tuning


def test_switch_and_restore():
    assert kernels.get_backend() == "triton"            # the autouse fixture
    with kernels.backend("reference"):
        assert not kernels.use_triton(torch.zeros(1))
    assert kernels.use_triton(torch.zeros(1))
    assert not kernels.use_triton(torch.zeros(1, dtype=torch.float64))    # float64: reference
    with pytest.raises(MoecKernelError, match="unknown"):
        kernels.set_backend("cuda")


def test_auto_sends_cpu_to_reference():
    with kernels.backend("auto"):
        assert not kernels.use_triton(torch.zeros(1))


def test_unsupported_dtype_is_a_clear_error():
    from moec.codegen.experts_launch import experts_forward
    x = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(MoecKernelError, match="unsupported"):
        experts_forward(x, None, None, 1, [], "", "silu", 1.0, 1.0)


def test_token_buckets_and_pinning():
    assert [tuning.bucket(t) for t in (1, 16, 17, 4096, 5000)] == [1, 16, 32, 4096, 8192]
    dev = torch.device("cpu")
    a = tuning.tile("down", 8, 2, 64, 32, torch.float32, dev, 100)
    assert a == tuning.tile("down", 8, 2, 64, 32, torch.float32, dev, 120)
    pinned = tuning.Tile(16, 16, 16, 1, 1)
    with tuning.pin(down=pinned):
        assert tuning.tile("down", 8, 2, 64, 32, torch.float32, dev, 100) == pinned
    assert tuning.tile("down", 8, 2, 64, 32, torch.float32, dev, 100) == a


def test_every_kernel_has_gpu_defaults():
    for name in ("gate_up", "gate_up_bwd", "down", "down_dx", "wgrad", "wgrad_dual"):
        for rows in (1, 4096):
            for dtype in (torch.bfloat16, torch.float32):
                t = tuning._default(name, rows, dtype)
                assert t.block_m >= 16 and t.block_n >= 16 and t.block_k >= 16
