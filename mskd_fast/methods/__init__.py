"""Training methods other than MSKD itself: the losses of the paper's comparison methods."""

from .partial_softmax import PartialSoftmaxBCELoss, partial_softmax_loss

__all__ = ["PartialSoftmaxBCELoss", "partial_softmax_loss"]
