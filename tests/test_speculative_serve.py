"""Serving with speculation verifies every sequence's proposals in one forward whose products run the few-row
kernel of generate's verification (``ember_linear_rows``: each row rounded as a one-token step), so greedy text
with speculation is plain decoding's, at 1 and 4 streams, in bf16 too."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.runtime import ops
from ember.sampling import SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("streams", [1, 4])
def test_served_speculation_equals_plain(hf_checkpoint, dtype, streams):
    from test_speculative import _serve

    folder, _ = hf_checkpoint("qwen3")
    llm = ember.load(folder, device="cpu", check_memory=False, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    ps = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 17, 4, 12)[:streams]]
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    params = [(greedy, None)] * streams
    plain, _ = _serve(llm, ps, params)
    llm.speculate(draft=llm, num_speculative=3, adaptive=False)  # the target drafting for itself
    try:
        served, m = _serve(llm, ps, params)
    finally:
        llm.speculate()
    assert served == plain
    if streams == 1:  # one row a step: serving's plain step and the proposals round as the verification does
        assert m["speculative_accepted"] == m["speculative_proposed"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_rows_products_round_as_one_row(dtype):
    """Inside exact_rows() a multi-row Linear and a fused q/k/v projection give each row the bits of that row
    alone (outside it, the multi-row kernel sums in another order: fp32 rows differ in their last bits)."""
    from ember.models.linear import Linear

    torch.manual_seed(0)
    lins = [Linear(2048, n, bias=n == 256).to(dtype).requires_grad_(False) for n in (512, 256, 256)]
    x = torch.randn(5, 2048).to(dtype)
    with torch.inference_mode():
        alone = [torch.cat([m(x[i:i + 1]) for i in range(5)]) for m in lins]
        plain = lins[0](x)
        with ops.exact_rows():
            rows = lins[0](x)
            projected = ops.project(x, lins)
    assert torch.equal(rows, alone[0]) and all(torch.equal(a, b) for a, b in zip(projected, alone))
    if dtype is torch.float32:
        assert not torch.equal(plain, alone[0])  # what the context changes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_every_row_count_and_shape(dtype):
    """``ember_linear_rows`` groups the activation rows (threes and pairs, a lone last row) over every 4-row weight
    block: for 2..13 rows, a row count of the output not a multiple of 4, and inner sizes on and off the AVX2
    kernels' strides, each row equals ``linear_many`` over that row alone, bit for bit, bias included."""
    from ember.kernels import matmul

    torch.manual_seed(1)
    for O, I in ((13, 96), (8, 48), (7, 40)):
        ks = [matmul.dense_kernel(torch.randn(O, I).to(dtype), torch.randn(O).to(dtype)),
              matmul.dense_kernel(torch.randn(O + 3, I).to(dtype))]
        if ks[0] is None:
            pytest.skip("native kernels unavailable")
        for M in range(2, 14):
            x = torch.randn(M, I).to(dtype)
            rows = matmul.linear_rows(ks, x)
            assert rows is not None
            for i in range(M):
                alone = matmul.linear_many(ks, x[i:i + 1].clone())
                for a, b in zip(rows, alone):
                    assert torch.equal(a[i], b[0]), f"O={O} I={I} M={M} row {i}"
