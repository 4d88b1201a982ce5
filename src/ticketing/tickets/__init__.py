"""The tickets service: the source of truth for tickets, their reservations and sales."""
