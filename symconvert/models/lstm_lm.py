"""The paper's word-level recurrent language model (Zaremba et al. 2014 "medium" setting).

Architecture, as in PyTorch's ``examples/word_language_model`` that the paper's code
(``symmRNN``) builds on: tokens[T, B] -> Embedding(V, emb) -> dropout -> nn.LSTM(emb, hidden,
layers, dropout between layers) -> dropout -> Linear(hidden, V) = logits[T, B, V]; the decoder
may share the embedding matrix (``tied``, needs emb == hidden). Defaults are the paper's: 2
layers, 650 units, dropout 0.5. The recurrent layer is a plain ``nn.LSTM`` (or ``nn.GRU``) so
that symconvert can parametrize its ``weight_hh_l*`` gate blocks.

Build it as ``py:symconvert.models.lstm_lm:lstm_lm`` with keyword arguments
(``vocab_size``, ``emb``, ``hidden``, ``layers``, ``dropout``, ``tied``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LSTMLanguageModel", "Hidden", "lstm_lm", "lstm_lm_small"]

Hidden = tuple[torch.Tensor, torch.Tensor] | torch.Tensor  # (h, c) for LSTM, h for GRU


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> nn.LSTM -> dropout -> Linear decoder; time-major [T, B] input."""

    #: Lets training, evaluation and reporting code choose perplexity over top-1.
    is_language_model = True

    def __init__(
        self,
        vocab_size: int = 10000,
        emb: int = 650,
        hidden: int = 650,
        layers: int = 2,
        dropout: float = 0.5,
        tied: bool = False,
        rnn_type: str = "lstm",
    ) -> None:
        super().__init__()
        rnn_type = rnn_type.lower()
        if rnn_type not in ("lstm", "gru"):
            raise ValueError(f"rnn_type must be 'lstm' or 'gru', got {rnn_type!r}")
        if tied and emb != hidden:
            raise ValueError(f"tied weights need emb == hidden, got emb={emb}, hidden={hidden}")
        self.vocab_size = vocab_size
        self.emb = emb
        self.hidden = hidden
        self.layers = layers
        self.tied = tied
        self.rnn_type = rnn_type

        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emb)
        rnn_cls = nn.LSTM if rnn_type == "lstm" else nn.GRU
        # nn.LSTM only applies its dropout between layers; a 1-layer model would warn.
        self.rnn = rnn_cls(emb, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab_size)
        self._init_weights()
        if tied:
            # Press & Wolf 2016: one matrix for input embedding and output projection.
            self.decoder.weight = self.encoder.weight

    def _init_weights(self, init_range: float = 0.1) -> None:
        nn.init.uniform_(self.encoder.weight, -init_range, init_range)
        nn.init.uniform_(self.decoder.weight, -init_range, init_range)
        nn.init.zeros_(self.decoder.bias)

    def forward(
        self, input: torch.Tensor, hidden: Hidden | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        """``input[T, B]`` token ids -> ``(logits[T, B, V], hidden)``; ``hidden=None`` starts at 0."""
        x = self.drop(self.encoder(input))
        output, hidden = self.rnn(x, hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz: int) -> Hidden:
        """Zero state for a batch of ``bsz``: ``(h, c)`` each ``[layers, bsz, hidden]`` (GRU: ``h``)."""
        ref = self.decoder.bias
        h = ref.new_zeros(self.layers, bsz, self.hidden)
        return (h, h.clone()) if self.rnn_type == "lstm" else h

    @staticmethod
    def detach_hidden(hidden: Hidden) -> Hidden:
        """Cut the graph between BPTT segments while keeping the state's values."""
        if isinstance(hidden, torch.Tensor):
            return hidden.detach()
        return tuple(h.detach() for h in hidden)  # type: ignore[return-value]


def lstm_lm(
    vocab_size: int = 10000,
    emb: int = 650,
    hidden: int = 650,
    layers: int = 2,
    dropout: float = 0.5,
    tied: bool = False,
    rnn_type: str = "lstm",
) -> LSTMLanguageModel:
    """The paper's LM: 2-layer LSTM, 650 units, dropout 0.5 (vocabulary size from the corpus)."""
    return LSTMLanguageModel(vocab_size, emb, hidden, layers, dropout, tied, rnn_type)


def lstm_lm_small(
    vocab_size: int = 10000,
    emb: int = 200,
    hidden: int = 200,
    layers: int = 2,
    dropout: float = 0.2,
    tied: bool = False,
    rnn_type: str = "lstm",
) -> LSTMLanguageModel:
    """The word_language_model example's defaults (2 x 200 units, dropout 0.2): for CPU tests."""
    return LSTMLanguageModel(vocab_size, emb, hidden, layers, dropout, tied, rnn_type)
