"""Every error vecpipe raises, in one hierarchy.

:class:`VecpipeError` is the base. Its two branches say who must act:

- :class:`UserError`: a person must change something (a setting, a flag, a service that is not
  running). The message is one sentence naming what was wrong, with which value, and what to
  do; ``vecpipe`` prints it and exits 2, never a traceback.
- :class:`PipelineError`: something went wrong while records flowed. Either the failure is
  :class:`TransientError` (an outage: retried with backoff) or it is :class:`PermanentError`
  (the record's own fault: dead-lettered, never retried). ``vecpipe.retry`` classifies the
  exceptions of the client libraries into these two; this module imports none of them, so
  that ``vecpipe --help`` stays light.
"""

from __future__ import annotations

__all__ = [
    "BenchError",
    "CommandError",
    "ConfigError",
    "DeadLetterRateExceeded",
    "DeliveryFailed",
    "DeliveryRefused",
    "IndexOperationError",
    "InvalidMessage",
    "MigrationError",
    "ModelOutOfMemory",
    "PermanentError",
    "PipelineError",
    "PlanError",
    "ReplayError",
    "SearchError",
    "ServiceError",
    "TransientError",
    "Unreachable",
    "UserError",
    "VecpipeError",
]


class VecpipeError(Exception):
    """The base of every error vecpipe raises on purpose."""


# -- a person must act -----------------------------------------------------------------------

class UserError(VecpipeError):
    """Something a person must change; the message is one sentence that says what and how."""


class ConfigError(UserError):
    """A configuration value is wrong; the message names the setting and says what to do."""


class Unreachable(UserError):
    """A service named by the configuration does not answer; the message names the setting."""


class CommandError(UserError):
    """A command's arguments cannot be carried out as given."""


class MigrationError(UserError):
    """A migration cannot be applied, or an applied one was edited."""


class IndexOperationError(UserError):
    """An index operation cannot go on."""


class PlanError(UserError):
    """A capacity-planning workload is impossible (negative rows, a page too small...)."""


class SearchError(UserError):
    """A search cannot run as configured or asked."""


class ReplayError(UserError):
    """A dead-letter replay cannot go on."""


class ServiceError(UserError):
    """A local service could not be started, stopped or found."""


class BenchError(UserError):
    """A benchmark cannot run (services missing, a bad size)."""


# -- while records flow ---------------------------------------------------------------------

class PipelineError(VecpipeError):
    """A failure while records flow through a stage."""


class TransientError(PipelineError):
    """A failure that a later attempt may not see (an outage, a timeout)."""


class DeliveryFailed(TransientError):
    """The broker did not acknowledge a produced message (it may, once it is back)."""


class ModelOutOfMemory(TransientError):
    """The device ran out of memory on a batch; smaller batches may fit."""


class PermanentError(PipelineError):
    """A failure of the input itself: retrying cannot help, the record goes to the dead letters."""


class InvalidMessage(PermanentError):
    """A message does not follow its contract; never retried, always dead-lettered."""


class DeliveryRefused(PipelineError):
    """The broker refused a message for good (too large, not authorized): neither retried nor
    dead-lettered; the worker stops with the reason, and the record stays uncommitted."""


class DeadLetterRateExceeded(PipelineError):
    """Too much of the input is failing: most likely a bad deploy, not bad records."""
