"""Comparing a bundle's logits with a reference's: the metrics, the thresholds, and one judge."""
