"""Surgery: which layers, the plan, convert/fold, calibration.

Importing the package registers the layer handlers beyond conv/linear (``layers.py``): one
line per handler module.
"""

from symconvert.surgery import attention, rnn  # noqa: F401  (nn.MultiheadAttention; LSTM/GRU/RNN)
