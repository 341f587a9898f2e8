"""Ring mode: candidate blocks travel between ranks instead of being gathered.

Every rank keeps only its own candidate block (embeddings plus the metadata of
:mod:`models.losses.columns`). Blocks move around the ring by point-to-point exchange
in both directions at once: after step ``s`` a rank holds the block of the rank ``s``
places to its left (it came along the left chain, one hop per step) and of the rank
``s`` places to its right, so ``ceil((W-1)/2)`` steps visit all ``W - 1`` foreign
blocks. With an even ``W`` the last step's two chains would bring the same (opposite)
block, so only the left chain runs it. Each step's exchange is posted before the
current blocks are scored, so transfer overlaps compute.

Backward travels the same way and recomputes each block's tiles. A block's gradient
accumulates as it travels: the rank that scored it at step ``s`` adds its part and
passes the running sum to the rank that scores it at step ``s + 1`` (posted after its
own compute, received by the next holder only once that one has computed its part);
the last holder sends it home. The owner thus gets the exact sum of every rank's
contribution, as the all-reduce of gather mode would give it.

Alive at any time, per chain: the block being scored, the next one in flight and two
gradient accumulators, whatever the world size. :data:`ring_memory` counts them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import Tensor

from clray.models.distributed import PendingP2P, post_p2p, ring_peer, world_size
from clray.models.losses.blockwise import BlockGrad, BlockSource

# Message tags, so exchanges between one pair of ranks can never be confused.
_EMB, _META, _GRAD, _HOME = 0, 1, 2, 3
_LEFT, _RIGHT = 0, 4


class RingMemory:
    """Live and peak bytes of the candidate blocks and gradients the ring allocated.

    Tensors are counted from allocation until Python frees them (a weakref finalizer),
    so a reference kept by mistake shows up as a higher peak, not just what the code
    meant to keep.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def reset(self) -> None:
        self.peak = self.live

    def track(self, tensor: Tensor) -> Tensor:
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._free, size)
        return tensor

    def _free(self, size: int) -> None:
        self.live -= size


ring_memory = RingMemory()


def _steps() -> tuple[int, int]:
    """Exchange steps of the left chain (blocks from the left) and of the right chain."""
    world = world_size()
    return world // 2, (world - 1) // 2


class _Shift:
    """One posted exchange of blocks along both chains: each sends right/left, receives from left/right."""

    def __init__(self, left: tuple[Tensor, Tensor] | None, right: tuple[Tensor, Tensor] | None) -> None:
        sends: list[tuple[Tensor, int, int]] = []
        recvs: list[tuple[Tensor, int, int]] = []
        self.chains: list[int] = []
        for chain, block, to, src in ((_LEFT, left, 1, -1), (_RIGHT, right, -1, 1)):
            if block is None:
                continue
            emb, meta = block
            sends += [(emb, ring_peer(to), chain + _EMB), (meta, ring_peer(to), chain + _META)]
            recvs += [
                (ring_memory.track(torch.empty_like(emb)), ring_peer(src), chain + _EMB),
                (ring_memory.track(torch.empty_like(meta)), ring_peer(src), chain + _META),
            ]
            self.chains.append(chain)
        self.pending = post_p2p(sends, recvs)

    def wait(self) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
        got = self.pending.wait()
        blocks: dict[int, tuple[Tensor, Tensor]] = {}
        for i, chain in enumerate(self.chains):
            blocks[chain] = (got[2 * i], got[2 * i + 1])
        return blocks.get(_LEFT), blocks.get(_RIGHT)


def _pass_grad(grad: Tensor, chain: int, to: int, src: int, tag: int) -> PendingP2P:
    """Send a gradient accumulator ``to`` places along and receive one from ``src`` places."""
    incoming = ring_memory.track(torch.empty_like(grad))
    return post_p2p([(grad, ring_peer(to), chain + tag)], [(incoming, ring_peer(src), chain + tag)])


class RingBlocks(BlockSource):
    """:class:`BlockSource` whose blocks are every rank's, visited by bidirectional ring exchange."""

    def forward_blocks(self, emb: Tensor, meta: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        yield emb, meta
        left_steps, right_steps = _steps()
        if left_steps == 0:
            return
        shift = _Shift((emb, meta), (emb, meta) if right_steps else None)
        for step in range(1, left_steps + 1):
            left, right = shift.wait()
            assert left is not None
            following = (left if step < left_steps else None, right if step < right_steps else None)
            shift = _Shift(*following) if following[0] is not None else None  # post before computing
            yield left
            if right is not None:
                yield right
            del left, right, following

    def backward_blocks(self, emb: Tensor, meta: Tensor, block_grad: BlockGrad) -> Tensor:
        d_local = block_grad(emb, meta)
        left_steps, right_steps = _steps()
        if left_steps == 0:
            return d_local
        shift = _Shift((emb, meta), (emb, meta) if right_steps else None)
        # The accumulator on its way to this rank for the block each chain brings next.
        incoming: dict[int, PendingP2P | None] = {_LEFT: None, _RIGHT: None}
        home: list[PendingP2P] = []
        for step in range(1, left_steps + 1):
            left, right = shift.wait()
            following = (left if step < left_steps else None, right if step < right_steps else None)
            shift = _Shift(*following) if following[0] is not None else None
            del following
            for chain, block, last, sign in ((_LEFT, left, left_steps, 1), (_RIGHT, right, right_steps, -1)):
                if block is None:
                    continue
                grad = ring_memory.track(block_grad(*block))
                del block
                arriving = incoming[chain]
                if arriving is not None:
                    grad += arriving.wait()[0]
                    incoming[chain] = None
                del arriving
                if step < last:  # on to the rank that scores this block next
                    incoming[chain] = _pass_grad(grad, chain, sign, -sign, _GRAD)
                else:  # this block's owner is `step` places away against the chain
                    home.append(_pass_grad(grad, chain, -sign * step, sign * step, _HOME))
                del grad
            del left, right
        for pending in home:
            d_local = d_local + pending.wait()[0]
        return d_local
