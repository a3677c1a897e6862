"""torchmetrics-based metrics, one module per task kind."""
