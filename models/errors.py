"""Typed errors shared by every model family.

Callers (workers, the HTTP API) map them: ``InvalidInputError`` is the user's to fix (4xx, never retried),
``ResourceExhaustedError`` is retryable, ``Cancelled`` and ``DeadlineExceeded`` are outcomes, not failures.
"""


class MGMFlowError(Exception):
    """Base of every error mgmflow raises on purpose."""

    code = "error"
    retryable = False


class InvalidInputError(MGMFlowError, ValueError):
    """The request itself is wrong (bad image, prompt, size, parameter)."""

    code = "invalid_input"


class InvalidImageError(InvalidInputError):
    """An image that cannot be decoded, is truncated, too large, or of an unusable kind."""

    code = "invalid_image"


class ContextLengthError(InvalidInputError):
    """A prompt (text and images) that leaves no room for its answer in the model's context."""

    code = "context_length_exceeded"  # OpenAI's code for the same refusal


class IncompleteOutputError(InvalidInputError):
    """A structured answer (JSON schema, regex) reached max_new_tokens before it was complete."""

    code = "incomplete_output"


class ModelNotFoundError(MGMFlowError):
    """Weights or files of a model are not where they were expected."""

    code = "model_not_found"


class ResourceExhaustedError(MGMFlowError):
    """Out of (GPU) memory: the same request may succeed later or elsewhere."""

    code = "resource_exhausted"
    retryable = True


class Cancelled(MGMFlowError):
    """The caller asked to stop; raised between steps or tokens."""

    code = "cancelled"


class DeadlineExceeded(MGMFlowError):
    """The request's deadline passed; raised between steps or tokens."""

    code = "timed_out"
