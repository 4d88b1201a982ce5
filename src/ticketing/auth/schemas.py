"""Request and response bodies of the auth service, with the contract's messages."""

from __future__ import annotations

from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from ticketing.common.text import is_clean_text


def _email(value: Any) -> str:
    message = "Email must be valid"
    if not is_clean_text(value):
        raise PydanticCustomError("email", message)
    try:
        checked = validate_email(value.strip(), check_deliverability=False)
    except EmailNotValidError:
        raise PydanticCustomError("email", message) from None
    return checked.normalized.lower()


def _new_password(value: Any) -> str:
    if not is_clean_text(value) or not 4 <= len(value.strip()) <= 20:
        raise PydanticCustomError("password", "Password must be between 4 and 20 characters")
    return value


def _given_password(value: Any) -> str:
    if not is_clean_text(value) or not value.strip():
        raise PydanticCustomError("password", "You must supply a password")
    return value


# Defaults plus validate_default make a missing field fail with the same message as a bad one.
Email = Annotated[str, BeforeValidator(_email), Field(default="", validate_default=True)]
NewPassword = Annotated[
    str, BeforeValidator(_new_password), Field(default="", validate_default=True)
]
GivenPassword = Annotated[
    str, BeforeValidator(_given_password), Field(default="", validate_default=True)
]


class SignupBody(BaseModel):
    email: Email
    password: NewPassword


class SigninBody(BaseModel):
    email: Email
    password: GivenPassword


class MagicLinkBody(BaseModel):
    email: Email


class UserOut(BaseModel):
    id: str
    email: str


class CurrentUserClaims(BaseModel):
    id: str
    email: str
    iat: int


class CurrentUserOut(BaseModel):
    currentUser: CurrentUserClaims | None
