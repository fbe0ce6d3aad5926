"""Offline research tooling, never run by the node: training, data sets, losses, evaluation, bench, statistics."""
