"""securefed: privacy-hardened federated learning for medical imaging."""

from securefed.errors import SecureFedError

__version__ = "0.1.0"
__all__ = ["SecureFedError", "__version__"]
