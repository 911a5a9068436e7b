"""`argmax_rows` (kvflow/csrc/cpu_argmax.h), greedy decoding's argmax on the LM head's own output:
equal to torch.argmax of the fp32 logits on every row, with the cases its lanes must get right:
maxima repeated across lanes and in the tail (the first wins), NaNs (the first NaN wins), rows of
-inf, rows shorter than a vector, and widths that are not multiples of 16."""

from __future__ import annotations

import pytest
import torch

from kvflow.model.cpu_kernels import load_extension

ext = load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="needs the C++ build")


def reference(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().argmax(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 5, 16, 17, 31, 48, 1000, 49152])
def test_random_rows_equal_torch(dtype, width):
    g = torch.Generator().manual_seed(width)
    logits = (torch.randn(9, width, generator=g) * 4).to(dtype)
    assert torch.equal(ext.argmax_rows(logits), reference(logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_nans_and_infinities_follow_torch(dtype):
    width = 70  # four vectors and a tail of 6
    rows = torch.randn(12, width, generator=torch.Generator().manual_seed(1))
    rows[0, [40, 3, 69]] = 9.0  # the same maximum in three lanes: the first index wins
    rows[1, [20, 4]] = 9.0  # lane 4 twice (index 20 is lane 4 of the second vector)
    rows[2, [66, 68]] = 9.0  # in the tail only
    rows[3, [65, 1]] = 9.0  # in the tail and in a vector
    rows[4] = float("-inf")  # no finite value: index 0
    rows[5, 33] = float("nan")  # a NaN is the maximum
    rows[6, [50, 7]] = float("nan")  # the first NaN
    rows[7, 67] = float("nan")  # in the tail
    rows[8, 2] = float("inf")
    rows[9, [10, 60]] = float("inf")
    rows[10] = 0.0  # all equal
    rows[11, 69] = 100.0  # the last element
    logits = rows.to(dtype)
    assert torch.equal(ext.argmax_rows(logits), reference(logits))
    assert ext.argmax_rows(logits).tolist()[:4] == [3, 4, 66, 1]


def test_a_strided_view_and_other_dtypes():
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ext.argmax_rows(logits[:, 8:40]), reference(logits[:, 8:40]))
    half = logits.half()
    assert torch.equal(ext.argmax_rows(half), half.argmax(-1))  # fp16: torch's own argmax
    with pytest.raises(RuntimeError, match="rows, vocab"):
        ext.argmax_rows(logits[0])
