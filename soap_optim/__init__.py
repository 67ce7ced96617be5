"""soap_optim: SOAP and its family of eigenbasis optimizers for PyTorch."""
from .soap import SOAP

__version__ = "0.1.0"

__all__ = ["SOAP", "__version__"]
