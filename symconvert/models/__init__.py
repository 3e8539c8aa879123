"""Models symconvert ships; importing this package registers the image models with timm.

After ``import symconvert.models``, ``timm.create_model(NAME)`` knows:

* ``wrn_16_4``, ``wrn_16_8``, ``wrn_28_10``, ``wrn_40_4`` — CIFAR wide ResNets with basic
  blocks (Zagoruyko & Komodakis 2016), and ``wrn_bottleneck_16_4``, ``wrn_bottleneck_28_10``
  — the bottleneck variant of the symmetry paper's code (``wrn.py``);
* ``resnet_cifar_tiny``, ``resnet_cifar_small`` — small CIFAR-style ResNets whose parameters
  are almost all in square 3x3 convs, and ``quickstart_digits`` — ``resnet_cifar_tiny`` with
  the packaged weights trained on scikit-learn's digits (``cifar_resnet.py``);
* ``cifar_resnet20/32/44/56/110`` — He et al.'s CIFAR ResNets with the checkpoint names of
  the public pytorch_resnet_cifar10 weights (``he_cifar.py``; real weights load with
  ``--weights``).

The word-level LSTM language model is a ``py:`` model, not a timm one:
``py:symconvert.models.lstm_lm:lstm_lm`` (``lstm_lm.py``).

Registration only defines classes and config dicts (no weights are read), so the cost of
importing this package is the cost of importing timm.
"""

from symconvert.models import cifar_resnet, fashion, he_cifar, wrn  # noqa: F401  (registers with timm)
from symconvert.models.cifar_resnet import CifarResNet
from symconvert.models.he_cifar import HeCifarResNet
from symconvert.models.lstm_lm import LSTMLanguageModel, lstm_lm
from symconvert.models.wrn import WideResNet

__all__ = ["CifarResNet", "HeCifarResNet", "LSTMLanguageModel", "WideResNet", "lstm_lm"]
