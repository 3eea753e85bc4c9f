"""MLflow: the runs training records into (and the buffer that outlives an outage of the tracking
store), the names gcl logs under, the embedding model logged as a pyfunc, registration with the
champion gate, and the served model's input parsing. Training, sweeps and search record here."""
