"""FedPFT Lab: federated proxy fine-tuning of foundation models, small enough to run on a laptop CPU."""
__version__ = "0.1.0"
