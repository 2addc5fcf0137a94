"""``tiled_mlp``: each decoder layer's MLP runs over the sequence in tiles, in forward and in backward.

Why: a decoder MLP widens every token, e.g. 4,096 -> 14,336 in Llama-3.1-8B. Its backward (or the recompute of a
checkpointed layer) holds several batch x seq x 14,336 tensors at once (gate, up, act(gate) * up and their grads):
at 64k tokens in bf16 each is 1.75 GiB, the largest activations of a long-context step once attention is O(seq)
and the loss is chunked. Run tile by tile, only one tile's intermediates exist at a time.

How (the TiledMLP of Snowflake's Arctic Long Sequence Training): a ``torch.autograd.Function`` whose forward runs the
MLP per tile under ``no_grad`` and saves only the input; its backward recomputes each tile with grad and
backpropagates that tile's slice of the output gradient, writing the input gradient slice and summing the parameter
gradients over tiles. The trainable parameters are inputs of the Function, so their gradients reach autograd as
usual (LoRA, hooks, accumulation); frozen ones (e.g. bitsandbytes 4-bit bases) are only read. The backward restores
the forward's RNG state (dropout, e.g. LoRA's, masks the same elements) and autocast state (the backward runs
outside ``autocast``). Inside non-reentrant activation checkpointing the Function is simply recomputed.

Tiling along the sequence is exact only for MLPs that compute each position on its own, which decoder MLPs
(dense and mixture-of-experts) do. Cost: the MLP runs once more per step (the backward's recompute).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

# Where a patched MLP keeps its own forward (to re-patch with another tile size, and to tell it is patched).
_ORIGINAL_FORWARD = "_hfplug_untiled_forward"
# Attribute names of the MLP in transformers' decoder layers (``feed_forward``: Llama 4, some MoE models).
MLP_NAMES = ("mlp", "feed_forward")


def _rng_state(x: torch.Tensor):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(x.device) if x.is_cuda else None)


class _TiledMLP(torch.autograd.Function):
    """``mlp_forward(x)`` over tiles of ``tile_len`` positions (dim -2); ``params``: the trainable parameters."""

    @staticmethod
    def forward(ctx, mlp_forward, tile_len, model_type, x, *params):
        ctx.mlp_forward, ctx.tile_len, ctx.params = mlp_forward, tile_len, params
        ctx.rng = _rng_state(x)
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            for start in range(0, x.shape[-2], tile_len):
                tile = x.narrow(-2, start, min(tile_len, x.shape[-2] - start))
                y = mlp_forward(tile)
                if not isinstance(y, torch.Tensor) or y.shape[:-1] != tile.shape[:-1]:
                    got = type(y).__name__ if not isinstance(y, torch.Tensor) else f"shape {tuple(y.shape)}"
                    raise ValueError(
                        f"tiled_mlp: the MLP of model type {model_type!r} returned {got} for an input of shape "
                        f"{tuple(tile.shape)}; only MLPs returning one tensor of the same positions can be tiled. "
                        "Turn tiled_mlp off for this model."
                    )
                if out is None:  # the output's width and dtype (autocast) are known from the first tile
                    out = y.new_empty(x.shape[:-1] + y.shape[-1:])
                out.narrow(-2, start, tile.shape[-2]).copy_(y)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[3]
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[4:]) if needed]
        targets = [ctx.params[i] for i in wanted]
        grad_x = torch.empty_like(x) if needs_x else None
        grad_params = [None] * len(targets)
        cpu_rng, cuda_rng = ctx.rng
        device_type, autocast_on, autocast_dtype = ctx.autocast
        # fork_rng: the recompute replays the forward's random numbers, then the RNG goes on as if it had not run.
        with torch.random.fork_rng(devices=[x.device] if cuda_rng is not None else []):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                for start in range(0, x.shape[-2], ctx.tile_len):
                    length = min(ctx.tile_len, x.shape[-2] - start)
                    tile = x.narrow(-2, start, length).detach().requires_grad_(needs_x)
                    y = ctx.mlp_forward(tile)
                    inputs = ([tile] if needs_x else []) + targets
                    grads = torch.autograd.grad(
                        y, inputs, grad_out.narrow(-2, start, length), allow_unused=True, materialize_grads=True
                    )
                    if needs_x:
                        grad_x.narrow(-2, start, length).copy_(grads[0])
                        grads = grads[1:]
                    for i, grad in enumerate(grads):
                        # Out of place: a gradient may alias grad_out (e.g. of an added parameter), not ours to change.
                        grad_params[i] = grad if grad_params[i] is None else grad_params[i] + grad
        result = [None] * len(ctx.params)
        for i, grad in zip(wanted, grad_params):
            result[i] = grad
        return None, None, None, grad_x, *result


def _tiled_forward(mlp: nn.Module, original, tile_tokens: int, model_type: str, x, *args, **kwargs):
    """The patched ``mlp.forward``: tiles only in training, with grad, when the sequence is longer than a tile."""
    if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2:
        return original(x, *args, **kwargs)
    # tile_tokens counts tokens of the whole batch: a tile is tile_tokens // batch positions long.
    tile_len = max(1, tile_tokens // max(1, math.prod(x.shape[:-2])))
    if not (mlp.training and torch.is_grad_enabled() and x.shape[-2] > tile_len):
        return original(x)
    params = [p for p in mlp.parameters() if p.requires_grad]
    return _TiledMLP.apply(original, tile_len, model_type, x, *params)


def _find_mlp(layer: nn.Module) -> nn.Module | None:
    for name in MLP_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    return None


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def enable_tiled_mlp(model: nn.Module, *, tile_tokens: int = 4096) -> int:
    """Run the MLP of each decoder layer of ``model`` (PEFT-wrapped or not) in tiles of at most ``tile_tokens`` tokens
    (batch x positions). Returns how many MLPs were patched. The MLP is the ``.mlp`` (or ``.feed_forward``) module
    of each transformers ``GradientCheckpointingLayer``; its forward is patched on the instance, so parameter names,
    state dicts and saved adapters do not change. Calling again changes the tile size."""
    if not isinstance(tile_tokens, int) or tile_tokens < 1:
        raise ValueError(f"tile_tokens must be an int >= 1 (tokens per tile, batch x positions), got {tile_tokens!r}.")
    from transformers.modeling_layers import GradientCheckpointingLayer

    model_type = _model_type(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    mlps = [mlp for mlp in map(_find_mlp, layers) if mlp is not None]
    if not mlps:
        raise ValueError(
            f"tiled_mlp: model type {model_type!r} ({type(model).__name__}) has no decoder-layer MLP to tile: no "
            f"transformers GradientCheckpointingLayer with a {' or '.join('.' + n for n in MLP_NAMES)} module "
            "(BERT-style layers split the MLP into intermediate/output with the residual inside). tiled_mlp "
            "supports decoder LMs such as Llama, Mistral, Qwen2 and Gemma; turn it off for this model."
        )
    for mlp in mlps:
        original = getattr(mlp, _ORIGINAL_FORWARD, None) or mlp.forward
        setattr(mlp, _ORIGINAL_FORWARD, original)
        mlp.forward = functools.partial(_tiled_forward, mlp, original, tile_tokens, model_type)
    return len(mlps)
