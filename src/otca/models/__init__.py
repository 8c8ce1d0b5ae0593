"""Generator adapters behind the :class:`~otca.models.base.FlowPolicy` interface."""

from otca.models.base import FlowPolicy

__all__ = ["FlowPolicy"]
