"""torchmetrics Metric classes, each with a functional twin (added by the analysis issues)."""

__all__: list[str] = []
