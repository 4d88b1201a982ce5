"""ticketing: an event-driven ticket marketplace built as Python microservices."""
