"""The registry of adapter kinds: the ``kind`` string stored in checkpoints → its class.

A kind is a :class:`~modlora.adapter.LowRankAdapter` subclass that implements the kind protocol
(see that class). It registers with one line, ``@register_kind``, in its own file; checkpoints,
the offline merge, PEFT export and training-state resume look kinds up here and never branch on
the kind string themselves.
"""

KINDS: dict[str, type] = {}


def register_kind(cls: type) -> type:
    """Class decorator: make ``cls`` loadable under ``cls.kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'kind'")
    if KINDS.get(kind, cls) is not cls:
        raise ValueError(f"kind {kind!r} is already registered by {KINDS[kind].__name__}")
    KINDS[kind] = cls
    return cls


def kind_class(kind: str) -> type:
    """The class registered under ``kind``.

    Raises:
        ValueError: an unknown kind (the known ones are listed).
    """
    try:
        return KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown adapter kind {kind!r}; known kinds {sorted(KINDS)}") from None
