"""The orders service: orders, their reservation window, and a replica of tickets."""
