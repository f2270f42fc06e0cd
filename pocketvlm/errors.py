"""Errors a user can cause. The CLI prints them as one line and exits 2; anything else is a bug (traceback, exit 1)."""

EXIT_USER_ERROR = 2


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
