"""gcl: Generalized Contrastive Learning for multi-modal retrieval and ranking.

Importing gcl is light: Ray, DeepSpeed and MLflow are imported where they are used.
"""

__version__ = "0.1.0"
