"""Another Python thread writing into any array argument while a call runs cannot crash the
process (issue 13, finding 1). The binding copies what decides which memory a kernel touches
(key_lengths, keys_ok, shapes and strides) before it releases the GIL and checks the copy, so a
racing caller can get a ValueError or garbage numbers, never a segfault or heap corruption.

The calls run in a child interpreter (with a timeout): a crash there fails this test instead
of ending the suite.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import random, sys, threading, time
    import numpy as np
    import attnext
    from attnext import _core

    sys.setswitchinterval(1e-5)
    rng = np.random.default_rng(0)
    DURATION = float(sys.argv[2])

    def floats(*shape, dtype=np.float64):
        return rng.standard_normal(shape).astype(dtype)

    B, H, L, S, E, U = 3, 2, 20, 40, 8, 6
    # valid and hostile values in turn, so that calls pass their checks and then see the array change
    INT_FILLS = [S, 1 << 40, 0, -1, 7, S + 3, S // 2, -(1 << 62), 3, 1 << 62]
    FLOAT_FILLS = [np.nan, np.inf, -np.inf, 1e300, 0.0, -1e300, 1.0]

    pick = random.Random(0)

    def fill(a, i):
        i = pick.randrange(1 << 20)  # not the loop count: GIL hand-offs fall at regular points of the loop
        if a.dtype == bool:
            a.view(np.uint8)[...] = (0, 1, 2, 255)[i % 4]  # 2 and 255: bytes that are no valid bool
        elif a.dtype.kind == "i":
            a[...] = INT_FILLS[i % len(INT_FILLS)]
        elif i % 3 == 2:
            a[...] = rng.standard_normal(a.shape)
        else:
            a[...] = np.asarray(FLOAT_FILLS[i % len(FLOAT_FILLS)]).astype(a.dtype, casting="unsafe")

    def race(name, call, *arrays):
        stop = threading.Event()

        def mutate():
            i = 0
            while not stop.is_set():
                for a in arrays:
                    fill(a, i)
                i += 1

        t = threading.Thread(target=mutate)
        t.start()
        calls = errors = 0
        last = ""
        end = time.perf_counter() + DURATION
        try:
            while time.perf_counter() < end:
                try:
                    call()
                except ValueError as e:  # a check that saw the racing writes: allowed
                    errors += 1
                    last = repr(e)[:120]
                    time.sleep(0)  # lets the writer run, so that the next call may see valid values
                calls += 1
        finally:
            stop.set()
            t.join()
        print(f"{name}: {calls - errors} calls ran, {errors} ValueErrors {last}", flush=True)

    case = sys.argv[1]
    for dt in (np.float32, np.float64):
        q, k, v = floats(B, H, L, E, dtype=dt), floats(B, H, S, E, dtype=dt), floats(B, H, S, E, dtype=dt)
        lengths = np.full((B, H), S, dtype=np.int64)
        bmask = rng.random((B, H, L, S)) < 0.7
        fmask = floats(B, H, L, S, dtype=dt)
        q3, k3, v3 = q[:, 0], k[:, 0], v[:, 0]
        wq, wk, vv, bias = floats(E, U, dtype=dt), floats(E, U, dtype=dt), floats(U, dtype=dt), floats(U, dtype=dt)
        l3 = np.full(B, S, dtype=np.int64)
        m3 = rng.random((B, L, S)) < 0.7
        if case == "sdpa":
            for rw in (False, True):  # the decode path (L <= 16 rows per call below) and the blocked path
                race(f"sdpa bool mask rw={rw}", lambda: _core.sdpa(q, k, v, bmask, True, 3, 5, 2, lengths, 0.3, rw, True),
                     q, k, v, bmask, lengths)
                race(f"sdpa float mask rw={rw}", lambda: _core.sdpa(q[:, :, :4], k, v, fmask[:, :, :4], False, 0, -1,
                                                                    -1, lengths, 0.3, rw, False), fmask, lengths)
            lb = np.full(B, S, dtype=np.int64)
            race("public sdpa", lambda: attnext.scaled_dot_product_attention(q, k, v, key_lengths=lb, is_causal=True),
                 lb, q)
            race("public sdpa bool mask", lambda: attnext.scaled_dot_product_attention(q, k, v, attn_mask=bmask),
                 bmask)
        elif case == "additive":
            raw, expo, ok = _core.additive_keys(k3, wk)
            raw, expo, ok = raw.copy(), expo.copy(), ok.copy()
            for rw in (False, True):
                race(f"additive_attention rw={rw}",
                     lambda: _core.additive_attention(q3, wq, bias, raw, expo, ok, v3, vv, m3, l3, rw),
                     raw, expo, ok, l3, m3, q3, v3, wq, vv, bias)
                race(f"additive_attention_keys rw={rw}",
                     lambda: _core.additive_attention_keys(q3, wq, bias, k3, wk, v3, vv, m3, l3, rw),
                     k3, wk, l3, m3, q3, v3)
            race("additive_keys", lambda: _core.additive_keys(k3, wk), k3, wk)
            race("public additive_attention",
                 lambda: attnext.additive_attention(q3, k3, v3, wq, wk, vv, key_lengths=l3, mask=m3), l3, m3, k3)
            layer = attnext.BahdanauAttention(E, E, U, dtype=dt) if "dtype" in \\
                attnext.BahdanauAttention.__init__.__code__.co_varnames else attnext.BahdanauAttention(E, E, U)
            lm = np.full(B, S, dtype=np.int64)
            keys = k3.copy()
            memory = layer.precompute(keys, key_lengths=lm)
            arrays = [lm, keys] + [a for a in (memory.key_lengths, memory.values)
                                   if isinstance(a, np.ndarray) and a.flags.writeable]
            race("BahdanauAttention", lambda: layer(q3[:, 0], memory), *arrays)
        elif case == "scores":
            w = floats(E, E, dtype=dt)
            race("score_product", lambda: _core.score_product(q, k, None, 0.5), q, k)
            race("score_product general", lambda: _core.score_product(q, k, w, 0.5), q, k, w)
            race("score_additive", lambda: _core.score_additive(q3, k3, wq, wk, vv, bias, 1.0), q3, k3, wq, wk, vv, bias)
            x, sm = floats(B, H, L, S, dtype=dt), rng.random((B, H, L, S)) < 0.5
            race("softmax", lambda: _core.softmax(x, sm, True, 2), x, sm)
            race("softmax float mask", lambda: _core.softmax(x, fmask, False, 0), x, fmask)
            wts = floats(B, H, L, S, dtype=dt)
            race("weighted_sum", lambda: _core.weighted_sum(wts, v), wts, v)
            x4, lw, lb = floats(B, L, 2, E, dtype=dt), floats(5, 2 * E, dtype=dt), floats(5, dtype=dt)
            race("linear", lambda: _core.linear(x4, lw, lb), x4, lw, lb)
            mha = attnext.MultiHeadAttention(2 * E, 2, dtype=dt) if "dtype" in \\
                attnext.MultiHeadAttention.__init__.__code__.co_varnames else attnext.MultiHeadAttention(2 * E, 2)
            xm, kl = floats(B, L, 2 * E, dtype=dt), np.full(B, L, dtype=np.int64)
            race("MultiHeadAttention", lambda: mha(xm, key_lengths=kl), xm, kl)
    print("survived", flush=True)
""")


# Seconds each argument is raced: ATTNEXT_HEAVY=1 races longer (tests/hardening/test_mutation_race.py
# races every registry kernel too).
RACE_SECONDS = "1.0" if os.environ.get("ATTNEXT_HEAVY") else "0.1"


@pytest.mark.parametrize("case", ["sdpa", "additive", "scores"])
def test_mutating_arguments_during_calls_never_crashes(case, tmp_path):
    script = tmp_path / "race.py"
    script.write_text(SCRIPT)
    try:
        proc = subprocess.run([sys.executable, str(script), case, RACE_SECONDS], capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: hung")
    assert proc.returncode == 0 and "survived" in proc.stdout, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
