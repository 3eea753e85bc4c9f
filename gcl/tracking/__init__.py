"""MLflow tracking: runs resumed by name, metrics buffered through an outage, the names gcl gives things."""
