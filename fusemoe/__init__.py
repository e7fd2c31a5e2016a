"""FuseMoE: mixture-of-experts fusion of irregular, possibly-missing multimodal data."""

__version__ = "0.1.0"
