"""nn.MultiheadAttention: its q/k/v projections are raw parameters, not nn.Linear.

``in_proj_weight`` is ``[3E, E]``: the q, k and v projections stacked, so a scheme sees it
as 3 square E x E blocks (``groups = 3``, like an LSTM's gates): ``block`` and ``channel``
make each of q, k, v symmetric. With ``kdim``/``vdim`` other than ``embed_dim`` the module
holds ``q_proj_weight`` ``[E, E]``, ``k_proj_weight`` ``[E, kdim]`` and ``v_proj_weight``
``[E, vdim]`` instead; each is a target of its own (a scheme skips the rectangular ones it
cannot hold, with its reason). ``out_proj`` is an nn.Linear and is planned as one.

The module's forward (and PyTorch's fused fast path of ``nn.TransformerEncoderLayer`` in
eval) reads ``self.in_proj_weight``: after conversion that is the parametrized property,
so both paths compute with the symmetric weight and nothing else needs refreshing.
Handled as kind ``linear`` (they are linear projections): ``--layers linear`` selects them.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from symconvert.surgery.layers import LayerHandler, TensorTarget, register_layer_handler

#: the q/k/v input projections calibration fits, and which of (query, key, value) each
#: reads (in_proj_weight, q/k/v stacked, reads all three)
PROJECTIONS = {"in_proj_weight": None, "q_proj_weight": 0, "k_proj_weight": 1,
               "v_proj_weight": 2}


class MultiheadAttentionHandler(LayerHandler):
    kind = "linear"
    calibration = "attention"

    def calibratable(self, module: nn.Module, tensor: str) -> bool:
        return tensor in PROJECTIONS

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def targets(self, module: nn.Module, options: dict) -> Iterator[TensorTarget]:
        if getattr(module, "in_proj_weight", None) is not None:
            shape = tuple(module.in_proj_weight.shape)
            yield TensorTarget("in_proj_weight", shape, 3 if shape[0] == 3 * shape[1] else 1)
            return
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            weight = getattr(module, name, None)
            if weight is not None:
                yield TensorTarget(name, tuple(weight.shape), 1)


register_layer_handler(MultiheadAttentionHandler())
