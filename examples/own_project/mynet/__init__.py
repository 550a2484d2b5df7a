"""A researcher's own model, trained and compared by caitlab without forking it."""

from mynet.net import MyNet

__all__ = ["MyNet"]
