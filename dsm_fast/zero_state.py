"""DeepSpeed's optimizer state without its partitioning, so a run resumes on another world size, ZeRO stage or
engine.

ZeRO 1–3 cut the fp32 master weights θ and the optimizer's per-element state (Adam's m = ``exp_avg`` and
v = ``exp_avg_sq``) into one flat partition per rank; DeepSpeed's own checkpoint stores those partitions and
refuses to load them on another number of ranks. At each checkpoint ``gather_full`` assembles, per parameter,
the full m and v with DeepSpeed's public ``safe_get_full_optimizer_state`` (a collective: every rank calls it, in
the same parameter order), plus the optimizer's scalar state (Adam's step count k, the same for every element:
every step updates every parameter); the full θ is the checkpoint's model.safetensors (the module's fp32 weights
equal the master weights: dsm_fast trains fp32 weights, bf16 only by autocast). ``scatter_full`` puts them back
into a freshly built engine: the module's weights, each parameter's fp32 master (``safe_set_full_fp32_param``)
and its slice of m and v (``safe_set_full_optimizer_state``), with k — after which the next Adam update
θ ← θ − lr · m̂ / (√v̂ + ε), m̂ = m / (1 − β₁ᵏ), v̂ = v / (1 − β₂ᵏ), is the uninterrupted run's, up to the
summation order of the gradient reduction over another number of ranks.

The same full tensors convert to and from a torch optimizer's state dict (``to_torch_state``,
``from_torch_state``), so a DeepSpeed run continues under ``single`` or ``ddp`` and the reverse.

DeepSpeed's universal checkpoint (``ds_to_universal`` then ``load_universal``) does the same through files of
its own, written by an offline conversion per checkpoint; its ZeRO-3 path has open reports of wrong results
(deepspeedai/DeepSpeed #6691; the multi-node fix #7601 not merged) and of missing files (#7546), and it loads with
``weights_only=False``. The state here is a part of our own checkpoint, read with ``weights_only=True`` and
checked against its digest like the rest (tests/test_engine_deepspeed.py: 2 → 1, 1 → 2 processes, ZeRO-2 → 3).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import distributed


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer stepping the flat fp32 partitions (ZeRO wraps it; without ZeRO it is the optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


def partitions(optimizer) -> list[torch.Tensor]:
    """The flat fp32 partitions this rank's torch optimizer steps (ZeRO-3 hands each to it only during its step)."""
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        return list(flats)
    return [p for group in inner_optimizer(optimizer).param_groups for p in group["params"]]


def partition_states(optimizer) -> list[tuple[torch.Tensor, dict]]:
    """(flat fp32 partition, its optimizer state) for each partition this rank steps and that holds state."""
    inner = inner_optimizer(optimizer)
    return [(p, inner.state[p]) for p in partitions(optimizer) if p in inner.state]


def moment_keys(optimizer) -> list[str]:
    """The per-element state entries (Adam: exp_avg, exp_avg_sq), agreed over the ranks (all ranks call)."""
    mine = {key for p, state in partition_states(optimizer) for key, value in state.items()
            if torch.is_tensor(value) and value.shape == p.shape}
    return sorted(set().union(*distributed.gather_objects(sorted(mine))))


def full_state(param: nn.Parameter, optimizer, key: str) -> torch.Tensor:
    """The full ``key`` state of one parameter, gathered from the ranks' partitions (all ranks call)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    full = safe_get_full_optimizer_state(param, key)
    return inner_optimizer(optimizer).state[param][key] if full is None else full  # ZeRO-0: not partitioned


def gather_full(module: nn.Module, optimizer, keep: bool) -> dict:
    """The optimizer state as full tensors per parameter name: {"moments": {key: {name: tensor}}, "scalars": {…}};
    every rank calls it (collectives), only where ``keep`` are the tensors kept (on the CPU). Empty before the
    first optimizer step (no state yet)."""
    keys = moment_keys(optimizer)
    if not keys:
        return {}
    moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in keys}
    for name, param in module.named_parameters():
        for key in keys:
            full = full_state(param, optimizer, key)
            if keep:
                moments[key][name] = full.detach().to("cpu", copy=True)
    flat, state = partition_states(optimizer)[0]
    scalars = {key: value.detach().cpu() if torch.is_tensor(value) else value for key, value in state.items()
               if not (torch.is_tensor(value) and value.shape == flat.shape)}
    group_step = inner_optimizer(optimizer).param_groups[0].get("step")  # apex FusedAdam counts per group
    return {"moments": moments, "scalars": scalars, **({"group_step": group_step} if group_step is not None else {})}


def scatter_full(module: nn.Module, optimizer, weights: dict[str, torch.Tensor], saved: dict,
                 partitioned: bool) -> None:
    """Set a fresh engine's module weights, fp32 master weights and optimizer state from ``weights`` (the full
    state dict) and ``saved`` (``gather_full``'s result, {} for none): every rank calls it with the same values.
    ``partitioned``: ZeRO-3, where the module holds only its shard of each weight."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0) if partitioned else contextlib.nullcontext():
        module.load_state_dict(weights)  # ZeRO-3: rank 0's copy is partitioned again on leaving the block
    inner, moments = inner_optimizer(optimizer), saved.get("moments", {})
    if moments:  # a fresh optimizer has no state until its first step: create it, then fill it below
        for flat in partitions(optimizer):
            inner.state[flat] = {**{key: value.to(flat.device).clone() if torch.is_tensor(value) else value
                                    for key, value in saved["scalars"].items()},
                                 **{key: torch.zeros_like(flat) for key in moments}}
        for group in inner.param_groups:
            if "group_step" in saved:
                group["step"] = saved["group_step"]
        link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO 1/2: each parameter's
        if link is not None:                                                      # view into the new state
            link()
    for name, param in module.named_parameters():
        safe_set_full_fp32_param(param, weights[name].to(torch.float32))
        for key, values in moments.items():
            if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
                safe_set_full_optimizer_state(param, values[name].to(param.device), key)
            else:  # ZeRO-0: the optimizer steps the module's own parameters
                inner.state[param][key].copy_(values[name])


def to_torch_state(optimizer: torch.optim.Optimizer, module: nn.Module, full: dict) -> dict:
    """A state dict for ``optimizer`` (a torch optimizer over ``module.parameters()``, in order) from
    ``gather_full``'s full tensors ({} before the first step: no state)."""
    names = [name for name, _ in module.named_parameters()]
    state = {index: {**{key: value.clone() if torch.is_tensor(value) else value  # one step count per parameter
                        for key, value in full["scalars"].items()},
                     **{key: values[name] for key, values in full["moments"].items()}}
             for index, name in enumerate(names)} if full else {}
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def from_torch_state(module: nn.Module, saved: dict) -> dict:
    """``gather_full``'s form of a torch optimizer's state dict over ``module.parameters()`` (in order); a parameter
    without state (never updated) gets zero moments."""
    if not saved["state"]:
        return {}
    first = next(iter(saved["state"].values()))
    keys = [key for key, value in first.items() if torch.is_tensor(value) and value.dim() > 0]
    moments = {key: {name: saved["state"][index][key] if index in saved["state"] else torch.zeros_like(param)
                     for index, (name, param) in enumerate(module.named_parameters())} for key in keys}
    return {"moments": moments, "scalars": {key: value for key, value in first.items() if key not in moments}}
