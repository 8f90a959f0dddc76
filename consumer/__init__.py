"""SalesTrainer sidecar: an SQS consumer that transcribes recordings and calls WordPress back."""

__version__ = "0.1.0"
