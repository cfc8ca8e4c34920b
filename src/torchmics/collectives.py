"""Hierarchical all-gather and reduce-scatter for partition groups that span nodes (docs/design.md §3).

A flat ring over a partition group of ``P`` ranks on ``m = P / G`` nodes pushes ``(P - 1) / P`` of the
unsharded unit through every node's network link. Gathering first among the ranks that share a local
rank (one per node, all ``G`` NICs of a node busy in parallel), then inside the node, cuts the inter-node
volume to ``(P - G) / P``; the rest moves over NVLink.

Both classes implement FSDP2's ``Comm`` interface (a private class: see :mod:`torchmics._fsdp`) and are
installed with ``set_custom_all_gather`` / ``set_custom_reduce_scatter``. FSDP2 passes the partition
group's process group; we use the topology's ``inter`` and ``intra`` sub-groups instead, which hold the
same ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import ReduceOp

from torchmics._fsdp import COMPLETED_ON_CURRENT_STREAM, AllGather, ReduceScatter, all_gather_single, reduce_scatter_single
from torchmics.topology import Topology


class _StagingBuffers:
    """Intermediate buffers reused across calls, one per (role, size, dtype, stream).

    FSDP2 issues all-gathers on one side stream and reduce-scatters on another; buffers are consumed
    within the call that fills them, on the stream of that call, so later calls on the same stream
    are ordered after earlier ones and may reuse the memory. Keying by stream keeps two streams from
    ever sharing a buffer.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        key = (role, numel, dtype, device, stream)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer


class _HierarchicalComm:
    """Shared state of the two collectives: the sub-groups and the staging buffers."""

    def __init__(self, topology: Topology) -> None:
        if not topology.hierarchical or topology.inter_group is None or topology.intra_group is None:
            raise ValueError(
                "hierarchical collectives need a partition group that spans nodes with several GPUs each "
                f"(partition_size > gpus_per_node > 1) and a topology from init_mesh(); got {topology.describe()}"
            )
        self.inter_group = topology.inter_group
        self.intra_group = topology.intra_group
        self.nodes = topology.nodes_per_partition
        self.gpus = topology.gpus_per_node
        self.staging = _StagingBuffers()

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Buffers FSDP2 keeps (outputs, gradient inputs) are fresh: only our intermediates are reused."""
        return torch.empty(*size, dtype=dtype, device=device)


class HierarchicalAllGather(_HierarchicalComm, AllGather):
    """Inter-node all-gather among same-local-rank ranks, intra-node all-gather, then one reorder."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        n, m, k = input_tensor.numel(), self.nodes, self.gpus
        across_nodes = self.staging.get("ag_inter", m * n, input_tensor.dtype, input_tensor.device)
        all_gather_single(across_nodes, input_tensor, group=self.inter_group)
        node_major = self.staging.get("ag_intra", k * m * n, input_tensor.dtype, input_tensor.device)
        all_gather_single(node_major, across_nodes, group=self.intra_group)
        # node_major is [local rank][node][shard]; FSDP2 wants partition-rank order [node][local rank].
        output_tensor.view(m, k, n).copy_(node_major.view(k, m, n).transpose(0, 1))
        return COMPLETED_ON_CURRENT_STREAM


class HierarchicalReduceScatter(_HierarchicalComm, ReduceScatter):
    """The mirror image: reorder, intra-node reduce-scatter, inter-node reduce-scatter."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: ReduceOp,
        async_op: bool = False,
    ) -> dist.Work | None:
        n, m, k = output_tensor.numel(), self.nodes, self.gpus
        local_major = self.staging.get("rs_intra", k * m * n, input_tensor.dtype, input_tensor.device)
        local_major.view(k, m, n).copy_(input_tensor.view(m, k, n).transpose(0, 1))
        node_partial = self.staging.get("rs_inter", m * n, input_tensor.dtype, input_tensor.device)
        reduce_scatter_single(node_partial, local_major, op=op, group=self.intra_group)
        # SUM of SUMs and AVG of equal-sized AVGs compose; a pre-multiplied sum must scale only once.
        second_op = op if op in (ReduceOp.SUM, ReduceOp.AVG) else ReduceOp.SUM
        reduce_scatter_single(output_tensor, node_partial, op=second_op, group=self.inter_group)
        return COMPLETED_ON_CURRENT_STREAM
