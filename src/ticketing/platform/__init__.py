"""Running the platform on one machine: embedded infrastructure, the gateway, `ticketing up`."""
