"""The evaluation layer: the one evaluator for every detector, thresholds, metrics, pictures, reports."""
