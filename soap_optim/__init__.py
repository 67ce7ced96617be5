"""soap_optim: SOAP and its family of eigenbasis optimizers for PyTorch."""
from .adafactor import Adafactor
from .adam import Adam, AdamW
from .groups import hidden_groups
from .shampoo import Shampoo
from .soap import SOAP

__version__ = "0.1.0"

__all__ = ["Adafactor", "Adam", "AdamW", "SOAP", "Shampoo", "__version__", "hidden_groups"]
