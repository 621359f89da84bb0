"""The FlexAttention paged backend against the torch reference (per-sequence SDPA over gathered
slots): decode rows and prefill chunks over scattered blocks, eager and compiled, and a sequence's
output bitwise equal alone vs in a batch; and the torch backend itself against per-sequence SDPA."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from server.engine.attn_flex import FlexAttention

H, KVH, HD, BS, NB = 4, 2, 16, 4, 48
CPU = torch.device("cpu")


def _world(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(NB * BS, KVH, HD, generator=g)
    v = torch.randn(NB * BS, KVH, HD, generator=g)
    perm = torch.randperm(NB, generator=g).tolist()
    tables, i = [], 0
    for blocks in (2, 4, 3, 5, 1):
        tables.append(perm[i : i + blocks])
        i += blocks
    return k, v, tables


def _slots(table: list[int], n: int) -> torch.Tensor:
    return torch.tensor([b * BS + o for b in table for o in range(BS)][:n])


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: list[int], pos: int) -> torch.Tensor:
    """q: [H, n, hd], queries at positions pos.. -> [n, H, hd]"""
    n = q.shape[1]
    slots = _slots(table, pos + n)
    kd, vd = k[slots].transpose(0, 1).unsqueeze(0), v[slots].transpose(0, 1).unsqueeze(0)
    mask = torch.arange(pos + n).unsqueeze(0) <= (torch.arange(n) + pos).unsqueeze(1)
    out = F.scaled_dot_product_attention(q.unsqueeze(0), kd, vd, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def _case(compiled: bool, backend: FlexAttention | None = None) -> None:
    k, v, tables = _world()
    flex = backend or FlexAttention(NB, BS, 8, CPU, compiled=compiled)
    g = torch.Generator().manual_seed(1)
    # three decode rows (last query of each context), then two prefill chunks
    decode = [(tables[0], 6), (tables[1], 13), (tables[2], 9)]
    chunks = [(tables[3], 8, 9), (tables[4], 0, 3)]  # (table, first position, length)
    dec_tables = [(t[: p // BS + 1], p) for t, p in decode]
    rows = [(3, 9), (12, 3)]
    ch_tables = [(t[: -(-(p + n) // BS)], p, n, r[0]) for (t, p, n), r in zip(chunks, rows, strict=True)]
    t = len(decode) + sum(n for _, _, n in chunks)
    q = torch.randn(H, t, HD, generator=g)
    out = flex.run(q, k, v, flex.prepare(dec_tables, ch_tables), None)
    want = [_reference(q[:, i : i + 1], k, v, tbl, p)[0] for i, (tbl, p) in enumerate(decode)]
    want += [
        _reference(q[:, s : s + n], k, v, tbl, p) for (s, n), (tbl, p, _) in zip(rows, chunks, strict=True)
    ]
    ref = torch.cat([want[0].unsqueeze(0), want[1].unsqueeze(0), want[2].unsqueeze(0), want[3], want[4]])
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    # each decode row alone, and each chunk alone, is the same bits as in the step
    for i, (tbl, p) in enumerate(dec_tables):
        alone = flex.run(q[:, i : i + 1], k, v, flex.prepare([(tbl, p)], []), None)
        assert torch.equal(alone[0], out[i]), f"decode row {i} differs alone vs batched"
    (s, n), (tbl, p, _, _) = rows[0], ch_tables[0]
    alone = flex.run(q[:, s : s + n], k, v, flex.prepare([], [(tbl, p, n, 0)]), None)
    assert torch.equal(alone, out[s : s + n]), "prefill chunk differs alone vs batched"


def test_flex_eager_matches_reference() -> None:
    _case(compiled=False)


@pytest.mark.slow
def test_flex_compiled_matches_reference() -> None:
    _case(compiled=True)


class _Layer(torch.nn.Module):
    layer_idx = 0


@pytest.mark.invariance
def test_torch_backend_decode_is_each_sequences_own_sdpa() -> None:
    """The torch backend gathers the decode sequences' contexts with one index_select per cache and
    group; each row is still bitwise the SDPA of its own gathered context, alone, in a batch, in any
    order and in groups cut by the cap."""
    from server.engine.attention import AttentionMetadata, KVCache, paged_attention
    from server.engine.step_inputs import decode_contexts

    k, v, tables = _world(3)
    cache = KVCache(1, NB * BS, KVH, HD, torch.float32, CPU)
    cache.k[0].copy_(k)
    cache.v[0].copy_(v)
    contexts = [_slots(t, n).numpy() for t, n in zip(tables, (6, 13, 9, 20, 1), strict=True)]
    q = torch.randn(H, len(contexts), HD, generator=torch.Generator().manual_seed(4))

    def run(rows: list[int], cap: int = 1 << 16) -> torch.Tensor:
        chosen = [contexts[i] for i in rows]
        last = torch.tensor([int(c[-1]) for c in chosen])  # the new token's slot: rewritten as it is
        meta = AttentionMetadata(last, len(rows), decode_kv=decode_contexts(chosen, CPU, cap))
        key, value = (c[0][last].transpose(0, 1).unsqueeze(0) for c in (cache.k, cache.v))
        extra: dict[str, Any] = {"loraplex_attention": meta, "loraplex_kv_cache": cache}
        out, _ = paged_attention(_Layer(), q[:, rows].unsqueeze(0), key, value, None, **extra)
        return out[0]

    batched = run(list(range(len(contexts))))
    for i, context in enumerate(contexts):
        slots = torch.from_numpy(context)
        kd, vd = k[slots].transpose(0, 1).unsqueeze(0), v[slots].transpose(0, 1).unsqueeze(0)
        want = F.scaled_dot_product_attention(q[:, i : i + 1].unsqueeze(0), kd, vd, enable_gqa=True)[0, :, 0]
        assert torch.equal(batched[i], want), f"row {i} is not its own SDPA"
        assert torch.equal(run([i])[0], want), f"row {i} differs alone"
    order = [3, 1, 4, 0, 2]
    assert torch.equal(run(order), batched[order])
    assert torch.equal(run(list(range(len(contexts))), cap=16), batched)  # groups of 6, 13, 9, 20, 1


def test_block_arrays_and_owners_match_a_loop_over_the_tables() -> None:
    """The flattened, vectorised tables (attn_flex._Flat) give what one loop per table gives."""
    import numpy as np

    from server.engine.attn_flex import FlexAttention, _Flat

    rng = np.random.default_rng(3)
    nb = 64
    flex = FlexAttention(nb, 16, 8, CPU, compiled=False)
    blocks = rng.permutation(nb).tolist()
    sizes = [5, 0, 1, 9, 0, 3]
    tables, i = [], 0
    for n in sizes:
        tables.append(blocks[i : i + n])
        i += n
    decode = [(t, 16 * len(t) - 1) for t in tables]
    for q_blocks in (1, 3):
        num, idx = flex._block_arrays(_Flat.of(tables), q_blocks)
        want_num = np.zeros((len(tables), 1, q_blocks), dtype=np.int32)
        want_idx = np.zeros((len(tables), 1, q_blocks, nb), dtype=np.int32)
        for b, table in enumerate(tables):
            want_num[b] = len(table)
            want_idx[b, 0, :, : len(table)] = table
        assert np.array_equal(num, want_num) and np.array_equal(idx, want_idx)
    flex._own(_Flat.of(tables), decode)
    want_owner, want_logical = np.full(nb, -1), np.zeros(nb)
    for seq_id, table in enumerate(tables):
        want_owner[table] = seq_id
        want_logical[table] = np.arange(len(table))
    assert flex.owner.tolist() == want_owner.tolist() and flex.logical.tolist() == want_logical.tolist()
    assert flex.dec_pos[: len(decode)].tolist() == [p for _, p in decode]
    assert _Flat.of([]).blocks.size == 0


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_refilled_static_decode_step_ignores_what_earlier_steps_left(compiled: bool) -> None:
    """fill_decode writes only the columns of the step's longest table: the index columns that a
    step with longer tables filled before stay behind, unread. A static step refilled after such
    a step attends exactly as a fresh one filled once, and as the reference does."""
    k, v, tables = _world()
    flex = FlexAttention(NB, BS, 8, CPU, compiled=compiled)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(H, 4, HD, generator=g)
    long = [(tables[3], 19), (tables[1], 15), (tables[2], 11), (tables[0], 7)]
    short = [(tables[4][:1], 2), (tables[0][:1], 0), ([], 0), (tables[2][:1], 3)]  # a padding row
    reused = flex.static_decode(4)
    flex.fill_decode(reused, long)
    flex.run(q, k, v, reused, None)
    flex.fill_decode(reused, short)
    assert reused.decode is not None
    assert reused.decode.kv_num_blocks.flatten().tolist() == [1, 1, 0, 1]
    out = flex.run(q, k, v, reused, None)
    fresh = flex.static_decode(4)
    flex.fill_decode(fresh, short)
    assert torch.equal(flex.run(q, k, v, fresh, None), out)
    for i, (table, pos) in enumerate(short):
        if table:
            ref = _reference(q[:, i : i + 1], k, v, table, pos)[0]
            assert torch.allclose(out[i], ref, atol=1e-5), (out[i] - ref).abs().max()
