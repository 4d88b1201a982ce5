"""The payments service: charges through Stripe, refunds, and a replica of orders."""
