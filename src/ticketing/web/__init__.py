"""The web client: server-rendered pages that call the services' HTTP APIs."""
