"""The hardening suites for attnext.torch (entries in torch_adapter.py): results and gradients
against the reference in every layout, dtype, mask and causal mode; bad tensors (dtype, device,
layout, not a tensor, mixed dtypes) rejected naming the argument; concurrent calls and torch
thread counts giving the same bits."""
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from .harness import LAYOUTS  # noqa: E402
from .kernels import CAUSAL, FULL_OPTIONS, MASKS, Case, Kernel, check_against_reference  # noqa: E402
from .torch_adapter import TORCH_KERNELS, as_tensor  # noqa: E402

ids = [k.name for k in TORCH_KERNELS]


def check(kernel, kw, to_tensor=as_tensor):
    """The registry's comparison (gradients measured against the call's largest gradient)."""
    entry = Kernel(kernel.name, kernel.make, lambda a: kernel.call(a, to_tensor), kernel.reference, grad=True)
    check_against_reference(entry, kw)


@pytest.mark.parametrize("kernel", TORCH_KERNELS, ids=ids)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts_and_dtypes_match_the_reference(kernel, layout, dtype):
    check(kernel, kernel.make(Case(seed=1, dtype=dtype, layout=layout, batch=(3,), options=FULL_OPTIONS,
                                   mask="float")))


@pytest.mark.parametrize("kernel", TORCH_KERNELS, ids=ids)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("causal", CAUSAL)
def test_masks_and_causal_match_the_reference(kernel, mask, causal):
    check(kernel, kernel.make(Case(seed=2, mask=mask, causal=causal, options=FULL_OPTIONS)))


@pytest.mark.parametrize("kernel", TORCH_KERNELS, ids=ids)
@pytest.mark.parametrize("seed", range(6))
def test_random_sizes_match_the_reference(kernel, seed):
    rng = np.random.default_rng(seed)
    lq, lk, d, dv, units = (int(x) for x in rng.integers(1, 9, size=5))
    options = {name: rng.choice(len(choices)) for name, choices in (("bias", (0, 1)), ("grad_weights", (0, 1)))}
    check(kernel, kernel.make(Case(seed=seed, batch=(int(rng.integers(1, 4)),), lq=lq, lk=lk, d=d, dv=dv, units=units,
                                   mask=MASKS[seed % len(MASKS)], options={k: bool(v) for k, v in options.items()})))


@pytest.mark.parametrize("kernel", TORCH_KERNELS, ids=ids)
def test_non_finite_inputs_propagate_as_in_the_reference(kernel):
    kw = kernel.make(Case(seed=3, options=FULL_OPTIONS))
    first = next(iter(kernel.tensors))
    kw[first] = np.array(kw[first])
    kw[first][..., 0, 0] = np.nan
    check(kernel, kw)


# A bad tensor for an argument: (what the argument becomes, the exception, the words it says).
BAD = {
    "int64": (lambda t: t.to(torch.int64), TypeError, "dtype torch.int64"),
    "float16": (lambda t: t.to(torch.float16), TypeError, "dtype torch.float16"),
    "bfloat16": (lambda t: t.to(torch.bfloat16), TypeError, "dtype torch.bfloat16"),
    "other_float": (lambda t: t.to(torch.float32 if t.dtype == torch.float64 else torch.float64), TypeError, "dtype"),
    "meta_device": (lambda t: t.to("meta"), ValueError, "meta"),
    "sparse": (lambda t: t.to_sparse(), ValueError, "layout"),
    "ndarray": (lambda t: t.numpy(), TypeError, "torch.Tensor"),
}


@pytest.mark.parametrize("kernel", TORCH_KERNELS, ids=ids)
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_tensors_are_refused_naming_the_argument(kernel, bad):
    kw = kernel.make(Case(seed=4, options=FULL_OPTIONS, mask="float"))
    change, error, words = BAD[bad]
    for name in kernel.tensors:
        if kw.get(name) is None:
            continue
        target = name

        def to_tensor(a, target=target):
            t = as_tensor(a)
            return change(t) if a is kw[target] else t

        with pytest.raises(error, match=f"{target}.*{words}|{words}.*{target}"):
            kernel.call(kw, to_tensor)


@pytest.mark.parametrize("kernel", TORCH_KERNELS, ids=ids)
def test_concurrent_calls_give_the_serial_bits(kernel):
    cases = [kernel.make(Case(seed=10 + i, dtype=np.float32, options=FULL_OPTIONS, mask="bool")) for i in range(4)]
    expected = [kernel.call(kw) for kw in cases]
    failures = []

    def work(i):
        try:
            for _ in range(10):
                got = kernel.call(cases[i])
                if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, expected[i])):
                    failures.append(f"thread {i}: results differ from the serial call")
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


@pytest.mark.parametrize("kernel", TORCH_KERNELS, ids=ids)
def test_torch_thread_count_does_not_change_the_bits(kernel):
    kw = kernel.make(Case(seed=20, batch=(4,), lq=33, lk=40, options=FULL_OPTIONS, mask="float"))
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(kernel.call(kw))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))
