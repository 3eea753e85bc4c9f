"""The whole job's configuration: one section per component, loaded from YAML.

Later components add their sections here; every key is documented where it is defined.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from gcl.config import FieldsConfig, Section
from gcl.loss import LossConfig
from gcl.model import ModelConfig


class JobConfig(Section):
    """A gcl job: the model to fine-tune, the fields of each side and the GCL loss."""

    name: str = "gcl"
    """Run name: MLflow run name and the folder for checkpoints (same name = resume)."""
    seed: int = 0
    """Seed for model init, data order and sampling."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    fields: FieldsConfig = Field(default_factory=FieldsConfig)
    loss: LossConfig = Field(default_factory=LossConfig)

    @model_validator(mode="after")
    def _check_field_pair_terms(self) -> JobConfig:
        for i, term in enumerate(self.loss.field_pair_terms):
            if term.left not in self.fields.left:
                raise ValueError(f"loss.field_pair_terms.{i}.left={term.left!r} is not a left field: {sorted(self.fields.left)}")
            if term.right not in self.fields.right:
                raise ValueError(f"loss.field_pair_terms.{i}.right={term.right!r} is not a right field: {sorted(self.fields.right)}")
        return self
