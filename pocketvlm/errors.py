"""Errors a user can cause. The CLI prints them as one line and exits 2; anything else is a bug (traceback, exit 1)."""

EXIT_USER_ERROR = 2


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """An exception's message (or a text) on one line -- runs of whitespace, newlines included, become one space --
    cut to `limit` characters with "..."; an exception's type name when it has no message."""
    text = " ".join(str(error).split()) or (error.__class__.__name__ if isinstance(error, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


class PocketVLMError(Exception):
    """Something the user can fix: a bad path, image, option or artifact. The message is the whole story."""


class SourceError(PocketVLMError):
    """A model source (Hub id or directory) that cannot be used."""


class MediaError(PocketVLMError):
    """An image or video that cannot be used."""


class ArtifactError(PocketVLMError):
    """An exported artifact that is missing, incomplete or does not match its manifest."""


class PromptError(PocketVLMError):
    """A question that cannot be turned into a prompt for this model (too long, reserved tokens)."""
