"""Scored-pair data: schema, validation, synthetic benchmark, splits and the Ray Data pipeline."""
