"""One exception hierarchy for every user-facing failure.

Each error carries what both front ends need to report it without a traceback:
a one-line ``message`` that says what to do, a process ``exit_code`` for the CLI
and an HTTP ``status`` plus a stable ``code`` for the REST API. Only the CLI
group and the API exception handler translate these; nothing else catches them.
"""

from __future__ import annotations


class AdaptrError(Exception):
    """Base of every error adaptr reports to a user."""

    exit_code = 1
    status = 500
    code = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # KeyError-style subclasses would otherwise quote the text
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class InvalidInputError(AdaptrError, ValueError):
    """The user gave something adaptr cannot accept: a file, a flag, a config."""

    exit_code = 2
    status = 422
    code = "invalid_input"


class CorruptFileError(InvalidInputError):
    """A file on disk is truncated, malformed or holds non-finite weights."""

    code = "corrupt_file"


class IncompatibleAdapterError(InvalidInputError):
    """An adapter does not fit the base it is applied to (shapes, ranks, modules)."""

    code = "incompatible_adapter"


class NotFoundError(InvalidInputError, LookupError):
    """A named thing (artifact, version, file) does not exist."""

    status = 404
    code = "not_found"


class UnknownNameError(NotFoundError, KeyError):
    """A strategy, quantizer, exporter or plugin name that is not registered."""

    code = "unknown_name"


class NameTakenError(InvalidInputError):
    """An artifact name is already used and ``--new-version`` was not given."""

    status = 409
    code = "name_taken"


class HasDescendantsError(InvalidInputError):
    """Removing an artifact would orphan artifacts derived from it."""

    status = 409
    code = "has_descendants"


class PluginError(AdaptrError):
    """A plugin misbehaved: failed to load, or registered an invalid or duplicate name."""

    code = "plugin_error"


class DuplicateNameError(PluginError):
    """Two plugins registered the same name."""

    code = "duplicate_name"


class BackendUnavailableError(AdaptrError):
    """An explicitly requested backend cannot serve this device or dtype."""

    status = 503
    code = "backend_unavailable"


class SchemaOutdatedError(AdaptrError):
    """The catalog database is behind the code's migrations."""

    status = 503
    code = "schema_outdated"


class InsufficientSpaceError(AdaptrError):
    """The output would not fit on the target filesystem."""

    status = 507
    code = "insufficient_space"


class VerificationError(AdaptrError):
    """Stored files no longer match their recorded hashes, or a numeric check failed."""

    exit_code = 3
    status = 409
    code = "verification_failed"


class OperationError(AdaptrError):
    """An operation failed for a reason that is not the user's input (I/O, a bug in a plugin)."""

    code = "operation_failed"
