"""The auth service: accounts, password and magic-link sign-in, the session cookie."""
