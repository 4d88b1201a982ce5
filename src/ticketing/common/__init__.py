"""Code shared by every service: settings, database, errors, auth, events, messaging."""
