"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN): which weights a scheme sees, and how the
module is kept reading its parametrized weights.

Targets, per layer ``k`` and direction (``_reverse``):

* ``weight_hh_l{k}``: ``[G*H, H]``, seen as G square H x H gate blocks (``groups = G``,
  LSTM i,f,g,o: G = 4; GRU r,z,n: G = 3; plain RNN: G = 1), so ``channel`` makes each
  gate block symmetric, as in the paper (selected by default: ``--gates hh``);
* ``weight_ih_l{k}``: ``[G*H, I]``, only when the selection's gates include ``ih``
  (``--gates hh,ih``) and the gate blocks are square (I == H).

An LSTM with ``proj_size`` has rectangular recurrent blocks ``[4H, P]``; it is skipped.

nn.RNNBase does not read ``self.weight_hh_l0`` in its forward: it hands the list
``self._flat_weights`` to the fused kernel (cuDNN on GPU), a list built once and refreshed
only when torch notices that the weight objects changed. After conversion that list still
held the dense original, so without care the module would keep using a stale weight and
the packed parameters would get no gradient. ``after_convert`` therefore:

* refreshes ``_flat_weights`` from the parametrized properties in a forward pre-hook, once
  per call (one ``unpack`` per converted tensor; under ``no_grad`` the parametrization's
  cache makes it free), and empties the graph-carrying entries again after the call, so
  the module can still be deep-copied;
* replaces torch's own per-call refresh (``_update_flat_weights``: a no-op right after the
  pre-hook) and ``_init_flat_weights`` on the instance: torch's version would call
  ``flatten_parameters``, which on CUDA ``set_``s every tensor of the list into one cuDNN
  buffer — on a tensor computed from the packed parameters that rewires its autograd
  history and corrupts the gradient. Our refresh flattens only tensors that carry no graph
  (plain parameters, or weights computed under ``no_grad``); with graph-carrying weights
  the fused cuDNN kernel is still used and packs the weights into its buffer itself.

``after_fold`` removes all of it once the last parametrization of the module is gone and
rebuilds the ordinary flat-weight list, so a folded module is a plain nn.LSTM again.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from symconvert.surgery.layers import LayerHandler, TensorTarget, register_layer_handler

#: gate blocks per recurrent mode (nn.RNNBase.mode)
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_PATCHED = ("_update_flat_weights", "_init_flat_weights")
#: set by the pre-hook, consumed by the forward's own refresh: one unpack per call
_FRESH = "_symconvert_flat_weights_fresh"


class RNNHandler(LayerHandler):
    """nn.LSTM / nn.GRU / nn.RNN (and subclasses): gate blocks of ``weight_hh`` (and of
    ``weight_ih`` when square and selected)."""

    kind = "rnn"
    calibration = "recurrent"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.RNNBase) and module.mode in GATES

    def targets(self, module: nn.Module, options: dict) -> Iterator[TensorTarget]:
        gates = GATES[module.mode]
        hidden = module.hidden_size
        proj = getattr(module, "proj_size", 0)
        gate_choice = options.get("gates") or ["hh"]
        want_hh, want_ih = "hh" in gate_choice, "ih" in gate_choice
        directions = ("", "_reverse") if module.bidirectional else ("",)
        for layer in range(module.num_layers):
            for suffix in directions:
                hh = f"weight_hh_l{layer}{suffix}"
                shape = tuple(getattr(module, hh).shape)
                reason = None
                if not want_hh:
                    reason = "hidden-to-hidden weights not selected (--gates without hh)"
                elif proj:
                    reason = (f"LSTM with proj_size={proj}: recurrent gate blocks "
                              f"{hidden}x{proj} are not square")
                yield TensorTarget(hh, shape, gates, reason)

                ih = f"weight_ih_l{layer}{suffix}"
                shape = tuple(getattr(module, ih).shape)
                reason = None
                if not want_ih:
                    reason = "input-to-hidden weights not selected (pass --gates hh,ih)"
                elif shape[1] != hidden:
                    reason = (f"input-to-hidden gate blocks {hidden}x{shape[1]} are not square "
                              "(input size != hidden size)")
                yield TensorTarget(ih, shape, gates, reason)

    def after_convert(self, module: nn.Module) -> None:
        if not _has_hooks(module):
            module.register_forward_pre_hook(_before_forward)
            module.register_forward_hook(_after_forward, always_call=True)
            # Instance attributes shadow the class's methods (see the module docstring).
            module._update_flat_weights = types.MethodType(_update_flat_weights_once, module)
            module._init_flat_weights = types.MethodType(_init_flat_weights_no_grad, module)
        module._init_flat_weights()

    def after_fold(self, module: nn.Module) -> None:
        if parametrize.is_parametrized(module):  # other tensors of it are still symmetric
            module._init_flat_weights()
            return
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if fn in (_before_forward, _after_forward)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
        for name in (*_PATCHED, _FRESH):
            vars(module).pop(name, None)
        module._init_flat_weights()  # the class's own again: plain Parameters, flattened


def _has_hooks(module: nn.Module) -> bool:
    return any(fn is _before_forward for fn in module._forward_pre_hooks.values())


def refresh_flat_weights(module: nn.RNNBase) -> None:
    """Point ``module._flat_weights`` at the current (parametrized) weights.

    One attribute read per weight, so one ``unpack`` per converted tensor. Skipped when
    every weight is the very object already in the list (parametrization cache hit).
    """
    weights = [getattr(module, name, None) for name in module._flat_weights_names]
    current = module._flat_weights
    if len(current) == len(weights) and all(c is w for c, w in zip(current, weights, strict=True)):
        return
    module._flat_weights = weights
    module._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in weights]
    if all(w is None or w.grad_fn is None for w in weights):
        module.flatten_parameters()  # cuDNN's single buffer; a no-op off CUDA


def _before_forward(module: nn.RNNBase, args: tuple) -> None:
    refresh_flat_weights(module)
    vars(module)[_FRESH] = True


def _after_forward(module: nn.RNNBase, args: tuple, output) -> None:
    vars(module).pop(_FRESH, None)
    # The kernel's autograd node holds what backward needs; keeping graph-carrying tensors
    # in the module would make it un-deep-copyable (and pin the graph). None entries are
    # torch's own "partially initialised" state: flatten_parameters skips them.
    module._flat_weights = [
        None if w is not None and w.grad_fn is not None else w for w in module._flat_weights
    ]


def _update_flat_weights_once(module: nn.RNNBase) -> None:
    """nn.RNNBase._update_flat_weights (called at the top of forward) for a converted
    module: nothing to do right after the pre-hook; a direct ``module.forward(...)`` call,
    which runs no hooks, refreshes here."""
    if not vars(module).pop(_FRESH, False):
        refresh_flat_weights(module)


def _init_flat_weights_no_grad(module: nn.RNNBase) -> None:
    """nn.RNNBase._init_flat_weights for a converted module (called by ``.to()``/``_apply``
    and by ``after_convert``): the weights are read without a graph, so they can be
    flattened into cuDNN's buffer and deep-copied."""
    with torch.no_grad():
        refresh_flat_weights(module)


register_layer_handler(RNNHandler())
