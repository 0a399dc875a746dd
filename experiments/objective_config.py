"""What every objective's config has: the base of the records ``conf/objective/*.yaml`` instantiate.

``conf/objective/<name>.yaml`` names its record in ``_target_`` (:class:`~experiments.encoder_objective.EncoderConfig`,
:class:`~experiments.causal_objectives.BidirectionalConfig`, :class:`~experiments.causal_objectives.HealConfig`):
the group's keys, typed (the start-up check merges the config into it), with the range checks the
types cannot express (``validate``) and ``build(model, tokenizer, adapter, data, max_length,
history)``, which makes the objective.
"""

from dataclasses import dataclass
from typing import ClassVar

from .checks import ConfigError, bounded


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Keys every objective has; ``model_kind``: the models it is made for."""

    name: str
    train_c: float  # the C of the +C / −C rows
    model_kind: ClassVar[str]

    def validate(self, key: str = "objective") -> None:
        """Range checks the types cannot express; errors name ``<key>.<field>``."""
        if self.name != type(self).name:
            raise ConfigError(
                f"{key}.name={self.name!r} but {key}._target_ builds the {type(self).name!r} objective"
            )
        bounded(f"{key}.train_c", self.train_c, 0, lo_open=True)


def check_top_k(key: str, top_k: int | None) -> None:
    if top_k is not None:
        bounded(key, top_k, 1)
