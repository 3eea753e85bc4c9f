"""Search: embed a catalog with a registered model (Ray Data batch inference), build a FAISS index,
evaluate it against exact search, and the search model (embedding model + index) as a served and
registered MLflow pyfunc."""
