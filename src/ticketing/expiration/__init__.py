"""The expiration service: a delayed job per order, in Redis, that ends its reservation."""
