"""DeepCluster stages: one module per batch stage plus the code they share."""
