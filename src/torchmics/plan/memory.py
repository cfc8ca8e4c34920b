"""Peak memory per GPU of one training step: what decides which partition sizes are possible at all.

MiCS shards the model states (parameters, gradients, optimizer states) inside a partition group of
P GPUs only, so they cost 1/P of the model per GPU; everything else (gathered units in flight,
activations, logits) does not depend on P. The peak is at the start of backward, with every activation
still held; the estimate follows FSDP2 with mixed precision and ``zero_grad(set_to_none=True)``:

* sharded parameters stay fp32 (4 bytes per parameter) and AdamW adds two fp32 moments (8 bytes),
  divided by P;
* gradients exist at that peak only under accumulation (they are freed after every optimizer step):
  fp32 shards, except while two-hop sync defers the replica all-reduce, when FSDP2 accumulates the
  partial reduce-scatter output in ``reduce_bytes``. Without accumulation they only count where the
  end of backward (all gradients, no activations) is the higher point;
* FSDP2 keeps the root unit (embeddings and head) gathered during forward and holds the current block
  plus one prefetched block in ``param_bytes``; backward adds one block's unsharded gradient, produced
  in ``param_bytes`` and cast to ``reduce_bytes`` for the reduce-scatter. At a partition size of 1
  (without offload) ``train`` does not reshard after forward unless that does not fit, so every unit is
  still gathered when backward starts: ``param_bytes`` for every parameter, as autocast's cast cache in a
  plain loop (``Strategy.keeps_gathered``);
* activations per block follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", Eq. 1 without tensor parallelism): ``s*b*d*(34 + 5*a*s/d)`` bytes at 16 bits,
  where the ``5*a*s/d`` attention-score term vanishes with flash attention (PyTorch SDPA). With
  activation checkpointing only each block's input (``2*s*b*d``) is kept, plus one block recomputed;
* the fp32 loss: the log-softmax output it saves, the gradient arriving at it and the one leaving it,
  three times ``b*s*vocab*4`` when backward starts;
* DDP keeps fp32 parameters and its gradient buckets (another fp32 copy), and computes under autocast:
  its cast cache holds a ``param_bytes`` copy of every weight until backward, and the residual stream
  stays fp32, so each block's two layer-norm inputs take 4 bytes, not 2;
* hierarchical collectives (a partition group spanning nodes of ``G > 1`` GPUs) keep their staging
  buffers for the whole job (``torchmics.collectives``): per distinct unit size, the all-gather holds an
  inter-node buffer of ``1/G`` of the unsharded unit and an intra-node one of the whole unit in
  ``param_bytes``, the reduce-scatter the same two in ``reduce_bytes``; the units are the blocks and the
  root (what lies outside them), so ``(1 + 1/G) * (block + root) * (param_bytes + reduce_bytes)``;
* a quantized replica hop with error feedback keeps fp32 residuals: one gradient shard's worth
  (``4 * n / P``), plus ``4 * n / W`` for the re-quantized chunk each rank owns under the plain optimizer;
* a fixed ``overhead_bytes`` stands for the CUDA context, NCCL buffers and allocator fragmentation
  (assumption: 1 GiB);
* with CPU offload the sharded parameters, their gradients and the optimizer states live in host
  memory: the GPU keeps only what is gathered or computed (:func:`estimate_host_memory` counts the rest).

Checked against every run in ``benchmarks/results/`` (``tests/test_plan.py``): within 15% of
``torch.cuda.max_memory_allocated`` (which counts tensors only, so without the overhead).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torchmics.plan.model_spec import ModelSpec
from torchmics.plan.strategy import Strategy

GIB = 1024**3
MASTER_BYTES = 4  # fp32 sharded parameters and gradients (FSDP2 keeps the original dtype)
ADAM_BYTES = 8  # two fp32 moments
LOSS_COPIES = 3  # fp32 logits-sized tensors alive when backward starts
DEFAULT_OVERHEAD = 1 * GIB


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU at the peak of a training step, by component."""

    params: float
    grads: float
    optimizer: float
    gathered: float
    activations: float
    logits: float
    overhead: float
    staging: float = 0.0  # the hierarchical collectives' buffers; 0 unless a partition group spans nodes
    residuals: float = 0.0  # a quantized replica hop's error feedback; 0 without one

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def estimate_memory(
    model: ModelSpec,
    strategy: Strategy,
    world_size: int,
    gpus_per_node: int,
    micro_batch: int,
    activation_checkpointing: bool = False,
    flash_attention: bool = True,
    overhead_bytes: float = DEFAULT_OVERHEAD,
    accum: int = 1,
) -> MemoryEstimate:
    """Peak bytes per GPU for ``strategy`` on ``world_size`` GPUs (``gpus_per_node`` per node)."""
    p = strategy.partition(world_size, gpus_per_node)
    n = model.num_params
    optimizer_shards = world_size if strategy.optimizer_over_replicas else p
    activations = activation_bytes(model, micro_batch, activation_checkpointing, flash_attention)
    activations = activations * strategy.param_bytes / 2  # the formula counts 16-bit activations
    if _computes_under_autocast(strategy):  # fp32 residual: 2 more bytes per layer-norm input / kept input
        per_block = (1 if activation_checkpointing else 2) * 2 * micro_batch * model.seq_len * model.d_model
        activations += model.n_layer * per_block
    logits = LOSS_COPIES * micro_batch * model.seq_len * model.vocab_size * 4
    if accum > 1:
        deferred = strategy.kind != "ddp" and strategy.two_hop and world_size > p  # FSDP2's partial output
        held = (strategy.reduce_bytes if deferred else MASTER_BYTES) * n / p
    else:
        held = max(0.0, MASTER_BYTES * n / p - activations - logits)  # end of backward, if higher
    on_gpu = 0.0 if strategy.cpu_offload else 1.0
    return MemoryEstimate(
        params=on_gpu * MASTER_BYTES * n / p,
        grads=on_gpu * held + (MASTER_BYTES * n if strategy.kind == "ddp" else 0.0),  # DDP: + its buckets
        optimizer=on_gpu * ADAM_BYTES * n / optimizer_shards,
        gathered=_gathered_bytes(model, strategy, p),
        activations=activations,
        logits=logits,
        overhead=overhead_bytes,
        staging=staging_bytes(model, strategy, p, gpus_per_node),
        residuals=residual_bytes(model, strategy, p, world_size),
    )


def residual_bytes(model: ModelSpec, strategy: Strategy, partition_size: int, world_size: int) -> float:
    """Error feedback of a quantized replica hop: an fp32 copy of the gradient shard (what each contribution
    missed), and under the plain optimizer an fp32 copy of the owned chunk (what its re-quantization missed)."""
    if not strategy.error_feedback_residuals or world_size == partition_size:
        return 0.0
    owned = 0.0 if strategy.optimizer_over_replicas else MASTER_BYTES * model.num_params / world_size
    return MASTER_BYTES * model.num_params / partition_size + owned


HOST_BASELINE = 3 * GIB  # assumption: one rank's process (torch, CUDA context, libraries, data) in host memory


@dataclass(frozen=True)
class HostMemoryEstimate:
    """Host bytes per rank: while the model is built and initialized, and while it trains.

    torchmics builds on ``meta`` and initializes on the GPU (torchmics.materialize), so no rank
    ever holds the whole model in host memory; what lands there is the offloaded model states.
    """

    init: float
    training: float

    @property
    def peak(self) -> float:
        return max(self.init, self.training)


def estimate_host_memory(
    model: ModelSpec, strategy: Strategy, world_size: int, gpus_per_node: int, baseline_bytes: float = HOST_BASELINE
) -> HostMemoryEstimate:
    """Host bytes per rank for ``strategy``: the process, plus its offloaded shards (CPU offload)."""
    if not strategy.cpu_offload:
        return HostMemoryEstimate(init=baseline_bytes, training=baseline_bytes)
    p = strategy.partition(world_size, gpus_per_node)
    optimizer_shards = world_size if strategy.optimizer_over_replicas else p
    params = MASTER_BYTES * model.num_params / p
    states = params + MASTER_BYTES * model.num_params / p + ADAM_BYTES * model.num_params / optimizer_shards
    return HostMemoryEstimate(init=baseline_bytes + params, training=baseline_bytes + states)


def _computes_under_autocast(strategy: Strategy) -> bool:
    """DDP never casts its fp32 parameters: low-precision compute comes from autocast."""
    return strategy.kind == "ddp" and strategy.param_bytes < MASTER_BYTES


def _gathered_bytes(model: ModelSpec, strategy: Strategy, partition_size: int) -> float:
    """Unsharded units in flight: root + current + prefetched block (every unit where they are kept
    gathered from forward to backward), and one block's full gradient.

    DDP gathers nothing; under autocast the cast cache holds a low-precision copy of every weight.
    """
    if strategy.kind == "ddp":
        return strategy.param_bytes * model.num_params if _computes_under_autocast(strategy) else 0.0
    kept = strategy.keeps_gathered(partition_size)  # as train shards
    in_flight = model.num_params if kept else model.embedding_params + 2 * model.layer_params
    params = strategy.param_bytes * in_flight
    cast = strategy.param_bytes if strategy.reduce_bytes != strategy.param_bytes else 0
    return params + (strategy.reduce_bytes + cast) * model.layer_params


def staging_bytes(model: ModelSpec, strategy: Strategy, partition_size: int, gpus_per_node: int) -> float:
    """Bytes the hierarchical collectives keep for the job: ``(1 + 1/G)`` unsharded copies per distinct unit
    size, once in the all-gather dtype and once in the reduce-scatter dtype (see the module docstring)."""
    if strategy.kind == "ddp" or not strategy.hierarchical or not partition_size > gpus_per_node > 1:
        return 0.0
    root = model.num_params - model.n_layer * model.layer_params
    unit_sizes = {model.layer_params, root} - {0}
    return (1 + 1 / gpus_per_node) * sum(unit_sizes) * (strategy.param_bytes + strategy.reduce_bytes)


def activation_bytes(
    model: ModelSpec, micro_batch: int, activation_checkpointing: bool, flash_attention: bool = True
) -> float:
    """Activations kept for backward at 16 bits (Korthikanti et al. 2022, no tensor parallelism)."""
    s, b, d, a = model.seq_len, micro_batch, model.d_model, model.n_head
    scores = 0.0 if flash_attention else 5 * a * s / d
    per_layer = s * b * d * (34 + scores)
    if activation_checkpointing:
        return model.n_layer * 2 * s * b * d + per_layer
    return model.n_layer * per_layer
