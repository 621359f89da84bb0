"""q/k/v and gate/up as slices (server/lora/fused.py): the sliced SGMV kernels against the unfused
ones (interpreted on CPU), the shared weights and slot buffers, and the whole model fused vs not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from server.lora.ops import LoRABatch, lora_reference
from server.lora.segments import build_segments
from server.model.base_gemm import DECODED_STATE, BaseGemm, dequantized_weight
from server.model.loader import BaseModel, load_base

triton_sgmv = pytest.importorskip(
    "server.lora.backends.triton_sgmv", reason="the triton extra is not installed"
)
CPU = torch.device("cpu")
WIDTHS = [64, 24, 40]  # a slice narrower than a column block, and one that ends mid-block
SLOTS, RANK = 5, 8


def _slices(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Three slices' factors side by side, as FusedProjections lays them out, per-slice ranks."""
    g = torch.Generator().manual_seed(0)
    n, d_in = len(WIDTHS), 48
    A = torch.randn(SLOTS, n * RANK, d_in, generator=g) / d_in**0.5
    B = torch.randn(SLOTS, RANK, sum(WIDTHS), generator=g)
    ranks = torch.randint(1, RANK + 1, (n, SLOTS), generator=g, dtype=torch.int32)
    ranks[1, 3] = 0  # slot 3 does not target slice 1
    for i in range(n):
        lo = sum(WIDTHS[:i])
        for s in range(SLOTS):
            r = int(ranks[i, s])
            A[s, i * RANK + r : (i + 1) * RANK] = 0.0
            B[s, r:, lo : lo + WIDTHS[i]] = 0.0
    scale = torch.rand(n, SLOTS, generator=g) + 0.5
    A[0], B[0], scale[:, 0], ranks[:, 0] = 0.0, 0.0, 0.0, 0
    return A.to(dtype), B.to(dtype), scale, ranks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sliced_kernels_are_the_unfused_kernels_bit_for_bit(dtype: torch.dtype) -> None:
    """One sliced shrink + expand over three projections' factors gives each slice's columns the
    same bits as that projection's own pair of launches, and matches the reference."""
    A, B, scale, ranks = _slices(dtype)
    g = torch.Generator().manual_seed(1)
    slots = torch.randint(0, SLOTS, (37,), generator=g)
    x = torch.randn(37, A.shape[2], generator=g)
    y0 = torch.randn(37, sum(WIDTHS), generator=g)
    seg = build_segments(slots.numpy(), CPU)
    fused = y0.clone()
    tiles = triton_sgmv.slice_tiles(WIDTHS, CPU)
    triton_sgmv.lora_sgmv(x, fused, A, B, scale, ranks, seg, tiles, len(WIDTHS))
    lo = 0
    for i, w in enumerate(WIDTHS):
        a, b = A[:, i * RANK : (i + 1) * RANK], B[:, :, lo : lo + w]
        alone = y0[:, lo : lo + w].contiguous()
        triton_sgmv.lora_sgmv(x, alone, a, b, scale[i], ranks[i], seg)
        assert torch.equal(fused[:, lo : lo + w], alone), f"slice {i} differs from its unfused kernels"
        want = y0[:, lo : lo + w] + lora_reference(x, a.float(), b.float(), scale[i], slots)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(alone, want, rtol=tol, atol=tol)
        lo += w


def test_slice_tiles_never_straddle_a_slice() -> None:
    tiles = triton_sgmv.slice_tiles(WIDTHS, CPU).tolist()
    assert tiles == [[0, 64, 88], [0, 1, 2], [64, 88, 128]]


def _load(path: Path, fuse: bool, mode: BaseGemm = BaseGemm.PLAIN) -> BaseModel:
    return load_base(
        path, "tiny", quantization="nf4", device="cpu", max_loras=2, max_lora_rank=8,
        lora_backend="triton", base_gemm=mode, fuse_projections=fuse,
    )  # fmt: skip


def test_members_share_one_weight_and_one_set_of_slots(tiny_checkpoint: Callable[[str], Path]) -> None:
    """Fusing moves no weight into a second copy: each member's packed NF4 bytes, decoded block
    scales and slot buffers are views of the group's, and dequantize to what they did unfused."""
    path = tiny_checkpoint("llama")
    plain, fused = _load(path, False), _load(path, True)
    groups = {id(m.group): m.group for m in fused.lora_layers.values() if m.group is not None}
    assert len(groups) == 4  # two layers x (q/k/v, gate/up)
    assert all(m.group is None for n, m in fused.lora_layers.items() if n.endswith(("o_proj", "down_proj")))
    for name, layer in fused.lora_layers.items():
        group = layer.group
        if group is None:
            continue
        before = plain.lora_layers[name]
        assert torch.equal(
            dequantized_weight(layer.base, torch.float32), dequantized_weight(before.base, torch.float32)
        )
        assert (
            layer.base.weight.data.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
        )
        assert getattr(layer.base, DECODED_STATE).absmax.untyped_storage().data_ptr() == (
            group.state.absmax.untyped_storage().data_ptr()
        )
        for mine, shared in (
            (layer.lora_A, group.A),
            (layer.lora_B, group.B),
            (layer.lora_scale, group.scale),
        ):
            assert mine.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
    unfused = load_base(path, "tiny", quantization="nf4", device="cpu", max_loras=2, lora_backend="torch")
    assert all(m.group is None for m in unfused.lora_layers.values())  # the torch backend never fuses


@pytest.mark.parametrize("mode", [BaseGemm.PLAIN, BaseGemm.TILED, BaseGemm.BNB])
def test_fused_model_matches_unfused(tiny_checkpoint: Callable[[str], Path], mode: BaseGemm) -> None:
    """The whole tiny Llama with two adapters in its slots and a mixed batch (base rows, both
    adapters, decode rows then a prefill chunk): fused logits within fp32 rounding of unfused (the
    base is one GEMM of another width), the LoRA term the same kernels' bits."""
    from server.lora.adapter import AdapterWeights, ConfigReport, ModuleLoRA
    from server.lora.slots import SlotTable

    path = tiny_checkpoint("llama")
    g = torch.Generator().manual_seed(3)
    outs = []
    for fuse in (False, True):
        base = _load(path, fuse, mode)
        table = SlotTable(base.lora_layers, 2)
        for key, rank in (("a", 4), ("b", 8)):
            g.manual_seed(rank)
            modules = {
                name: ModuleLoRA(
                    A=torch.randn(rank, s.in_features, generator=g) * 0.2,
                    B=torch.randn(s.out_features, rank, generator=g) * 0.2,
                    scale=2.0,
                )
                for name, s in base.linear_shapes.items()
                if not name.endswith("k_proj") or key == "b"  # "a" leaves k_proj alone
            }
            table.activate({key: AdapterWeights(modules=modules, report=ConfigReport())})
        ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
        base.lora_context.batch = LoRABatch.build([1, 0, 2], [(3, 10, 2)], CPU, sgmv=True, num_rows=10)
        with torch.no_grad():
            outs.append(base.model(ids).logits)
            base.lora_context.batch = None
            plain = base.model(ids).logits
        # the adapters are in the step: the rows routed to them move
        assert not torch.allclose(outs[-1][0, [0, 2, 5]], plain[0, [0, 2, 5]], atol=1e-2)
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-4)
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


def test_a_step_with_per_row_vectors_runs_each_member_alone(tiny_checkpoint: Callable[[str], Path]) -> None:
    """DoRA's and (IA)3's vectors apply per member, so a step using them runs the group unfused;
    a plain-LoRA step runs it whole."""
    base = _load(tiny_checkpoint("llama"), True)
    layer = base.lora_layers["model.layers.0.self_attn.k_proj"]
    group = layer.group
    assert group is not None
    layer.dora_slots.add(1)
    x = torch.randn(1, 3, layer.in_features)
    base.lora_context.batch = LoRABatch.build([1, 0, 0], [], CPU, sgmv=True, num_rows=3)
    assert group.output(0, x) is None
    base.lora_context.batch = LoRABatch.build([2, 0, 0], [], CPU, sgmv=True, num_rows=3)
    q = group.output(0, x)
    assert q is not None and q.shape == (1, 3, group.bounds[1])
    k, v = group.output(1, x), group.output(2, x)
    assert k is not None and v is not None and group._x is None  # every member served: released
    base.lora_context.batch = None
    np.testing.assert_array_equal(group.bounds, [0, 64, 96, 128])


def test_a_fused_layer_launches_fewer_kernels(tiny_checkpoint: Callable[[str], Path]) -> None:
    """What fusion is for: per decoder layer, 4 base products instead of 7, and 4
    sliced SGMV shrinks and expands instead of 7 each (counted as dispatched ops, the kernels a
    GPU launches for them)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    path = tiny_checkpoint("llama")
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    per_layer = {}
    for fuse in (False, True):
        base = _load(path, fuse)
        for layer in base.lora_layers.values():
            layer.loaded.add(1)  # the kernels run for a step's slots that are loaded (zeros here)
        base.lora_context.batch = LoRABatch.build([1] * 6, [], CPU, sgmv=True, num_rows=6)
        with torch.no_grad(), Count() as count:
            base.model(ids)
        base.lora_context.batch = None
        layers = base.model.config.num_hidden_layers
        # dequantizations by bitsandbytes or by our CPU kernel (the same bits, nf4_cpu.py), or
        # our CPU kernel's product that decodes the weight in registers instead
        dequant = sum(
            count.ops[op]
            for op in ("bitsandbytes.dequantize_4bit", "loraplex_nf4.dequantize", "loraplex_nf4.matmul")
        )
        names = ("loraplex.sgmv_shrink", "loraplex.sgmv_expand")
        per_layer[fuse] = [dequant / layers] + [count.ops[n] / layers for n in names]
    assert per_layer == {False: [7, 7, 7], True: [4, 4, 4]}
