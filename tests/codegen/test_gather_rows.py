"""The weight gradients' row gather against index_select: exact copies, any width, empty, int32
and int64 indices, a divisor (copy s reads token s // k), and the errors it names."""
import pytest
import torch

from moec.codegen.gather_kernel import gather_rows

from kernel_helpers import DEVICE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,H,R,div", [(9, 72, 27, 3), (5, 64, 5, 1), (1, 130, 8, 8), (7, 16, 0, 2)])
def test_gather_rows_copies_exactly(dtype, T, H, R, div):
    a = torch.randn(T, H, device=DEVICE).to(dtype)
    for idx_dtype in (torch.int64, torch.int32):
        idx = torch.randint(0, T * div, (R,), device=DEVICE, dtype=idx_dtype)
        got = gather_rows(a, idx, div)
        assert got.shape == (R, H) and got.dtype == dtype
        assert torch.equal(got, a.index_select(0, torch.div(idx, div, rounding_mode="floor")))


def test_gather_rows_reads_a_strided_source():
    a = torch.randn(6, 100, device=DEVICE)[:, 10:90]     # rows contiguous, stride 100
    idx = torch.tensor([5, 0, 3, 3, 1], device=DEVICE)
    assert torch.equal(gather_rows(a, idx), a[idx])


def test_gather_rows_names_what_is_wrong():
    a = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous rows"):
        gather_rows(a.t(), torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="int32 or int64"):
        gather_rows(a, torch.tensor([0.0], device=DEVICE))
