"""User schemas."""

from uuid import UUID

from pydantic import AnyHttpUrl, Field, StrictBool, StrictStr, field_validator

from fltraining.schemas.common import PublicModel, RequestModel, UtcDatetime

USERNAME_PATTERN = r"^[\w.@+-]+$"


class UserCreate(RequestModel):
    """Registration body."""

    username: StrictStr = Field(min_length=1, max_length=150, pattern=USERNAME_PATTERN)
    # No NUL (some hashers truncate at it); a pattern, so the OpenAPI document says so too.
    password: StrictStr = Field(min_length=8, max_length=1024, pattern=r"^[^\x00]*$")
    email: StrictStr = Field(default="", max_length=254)
    first_name: StrictStr = Field(default="", max_length=150)
    last_name: StrictStr = Field(default="", max_length=150)
    actor: StrictBool = False
    client: StrictBool = False
    message_endpoint: AnyHttpUrl | None = None

    @field_validator("username")
    @classmethod
    def ascii_username(cls, value: str) -> str:
        """Usernames are ASCII letters, digits and @.+-_ (as Django's default validator)."""
        if not value.isascii():
            raise ValueError("username may contain only ASCII letters, digits and @.+-_")
        return value


class UserPublic(PublicModel):
    """What anyone authenticated may see of a user."""

    id: UUID
    username: str
    email: str
    first_name: str
    last_name: str
    actor: bool
    client: bool
    message_endpoint: str | None


class UserRegistered(UserPublic):
    """The registration answer: the only place the token is ever shown."""

    token: str


class SessionStarted(PublicModel):
    """A sign-in: its own token (shown only here), when it expires, and who signed in."""

    token: str
    expires_at: UtcDatetime
    user: UserPublic
